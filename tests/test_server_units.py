"""Server pieces without an engine: detection, routing, token spans, artifact paths, interference routes."""

import numpy as np
import pytest

from alignment.artifact import Evidence, artifact_version, discover_interventions
from intervene_server.artifacts import ArtifactPathError, resolve_in_root, store_upload
from intervene_server.detection import LanguageDetector, split_sentences
from intervene_server.prompt_tokens import PromptTokenizer
from intervene_engine.request_spec import parse_request_spec
from intervene_server.registry import InterventionRegistry
from intervene_server.routing import LanguageRouter, RoutingError
from intervene_server.schemas import InterventionInfo

SWAHILI = "Habari ya asubuhi, rafiki yangu. Leo tunazungumza kuhusu elimu na afya ya watoto wetu."
ITALIAN = "Buongiorno a tutti, oggi parliamo della scuola e della salute dei nostri bambini."
ENGLISH = "The weather in the mountains was cold and windy all week long."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture()
def router(tokenizer, tmp_path):
    registry = InterventionRegistry(engine_client=None, root=tmp_path)
    for language, layers, alpha in (("swh_Latn", [0, 1], 1.0), ("ita_Latn", [1], 0.7)):
        registry.loaded[language] = InterventionInfo(
            language=language, target="eng_Latn", version=f"v-{language}", path=language,
            layers=layers, memory_bytes=0, serving={"alpha": alpha, "layers": layers, "positions": "last"},
        )
    # Calibrated: Estonian on layer 1 only, every prompt token; Turkish off (no clear gain).
    evidence = Evidence(task="xcopa", file="val.et.jsonl", items=100, plain_accuracy=0.55,
                        cross_validated_accuracy=0.55, delta=0.0, delta_ci95=[-0.03, 0.03], adopted=False,
                        fold_choices=[], candidate_accuracy={}, rule="...", date="today", engine={},
                        summary="XCOPA calibration: +0.0 points, 95% CI [-3.0, +3.0], gate not cleared")
    for language, serving in (("est_Latn", {"alpha": -0.5, "layers": [1], "positions": "prompt"}),
                              ("tur_Latn", {"alpha": 0.0, "layers": [0, 1], "positions": "last"})):
        registry.loaded[language] = InterventionInfo(
            language=language, target="eng_Latn", version=f"v-{language}", path=language, layers=[0, 1],
            memory_bytes=0, serving=serving, evidence=evidence)
    return LanguageRouter(registry, LanguageDetector(0.5), PromptTokenizer(tokenizer, CHAT_TEMPLATE),
                          served_models=("tiny",))


def test_detector_names_flores_codes_with_confidence():
    detector = LanguageDetector()
    for text, code in ((SWAHILI, "swh_Latn"), (ITALIAN, "ita_Latn"), (ENGLISH, "eng_Latn")):
        detection = detector.detect(text)
        assert detection.language == code and detection.confidence > 0.9


def test_sentences_keep_offsets_and_join_short_fragments():
    text = f"{ITALIAN} Ok. {SWAHILI}"
    spans = split_sentences(text)
    assert "".join(text[a:b] for a, b in spans) == text  # nothing lost, nothing overlapping
    assert all(b > a for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert not any(text[a:b].strip() == "Ok." for a, b in spans)  # too short to stand alone


def test_explicit_iso_codes_are_normalised(router):
    payload = {"prompt": "x", "vllm_xargs": {"language": "sw", "alpha": 0.5}}
    applied = router.route(payload, "completion")
    assert applied.applied and applied.language == "swh_Latn" and applied.source == "explicit"
    assert applied.alpha == 0.5 and applied.layers == [0, 1] and applied.positions == "last"
    assert payload["vllm_xargs"] == {"language": "swh_Latn", "alpha": 0.5}


def test_requests_naming_only_their_language_get_the_serving_defaults(router):
    payload = {"prompt": "x", "vllm_xargs": {"language": "et"}}
    applied = router.route(payload, "completion")
    assert applied.applied and applied.defaults == "calibrated"
    assert (applied.alpha, applied.layers, applied.positions) == (-0.5, [1], "prompt")
    # Only what the request set travels: the plugin resolves the rest against the bound version.
    assert payload["vllm_xargs"] == {"language": "est_Latn"}
    # What the request names wins over the defaults.
    payload = {"prompt": "x", "vllm_xargs": {"language": "et", "alpha": 0.25, "positions": "all"}}
    applied = router.route(payload, "completion")
    assert (applied.alpha, applied.layers, applied.positions) == (0.25, [1], "all")
    # Uncalibrated artifacts serve their manifest's values, and say so.
    applied = router.route({"prompt": "x", "vllm_xargs": {"language": "sw"}}, "completion")
    assert applied.applied and applied.defaults == "uncalibrated" and applied.alpha == 1.0


@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_a_model_name_base_colon_language_steers_with_the_serving_defaults(router, endpoint):
    payload = {"model": "tiny:et", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    applied = router.route(payload, endpoint)
    assert applied.applied and applied.source == "explicit" and applied.language == "est_Latn"
    assert (applied.alpha, applied.layers, applied.positions) == (-0.5, [1], "prompt")
    assert payload["model"] == "tiny" and payload["vllm_xargs"] == {"language": "est_Latn"}  # vLLM sees BASE
    payload = {"model": "tiny:est_Latn", "prompt": "x", "vllm_xargs": {"alpha": 0.25, "language": "et"}}
    applied = router.route(payload, endpoint)  # vllm_xargs override any field; the same language is no conflict
    assert (applied.alpha, applied.positions) == (0.25, "prompt")
    payload = {"model": "tiny", "prompt": "x"}
    assert not router.route(payload, endpoint).applied and payload["model"] == "tiny"


def test_a_model_name_and_another_language_in_vllm_xargs_conflict(router):
    payload = {"model": "tiny:swh_Latn", "prompt": "x", "vllm_xargs": {"language": "ita_Latn"}}
    with pytest.raises(RoutingError, match="name the language once") as raised:
        router.route(payload, "completion")
    assert raised.value.status == 400


@pytest.mark.parametrize("model", ["tiny:fra_Latn", "tiny:xx_Nope", "other:swh_Latn"])
def test_an_unknown_model_name_is_404_listing_the_models(router, model):
    with pytest.raises(RoutingError, match="does not exist") as raised:
        router.route({"model": model, "prompt": "x"}, "completion")
    assert raised.value.status == 404 and raised.value.param == "model"
    assert "models: tiny, tiny:est_Latn, tiny:ita_Latn, tiny:swh_Latn, tiny:tur_Latn" in str(raised.value)


def test_every_loaded_language_is_a_model_card_with_parent_base(router):
    base = {"id": "tiny", "object": "model", "root": "/m/tiny", "parent": None, "max_model_len": 64}
    cards = {card["id"]: card for card in router.language_model_cards(base)}
    assert sorted(cards) == ["tiny:est_Latn", "tiny:ita_Latn", "tiny:swh_Latn", "tiny:tur_Latn"]
    estonian = cards["tiny:est_Latn"]
    assert estonian["parent"] == "tiny" and estonian["root"] == "/m/tiny" and estonian["max_model_len"] == 64
    assert estonian["lingosteer"] == {"language": "est_Latn", "version": "v-est_Latn", "defaults": "calibrated",
                                      "serving": {"alpha": -0.5, "layers": [1], "positions": "prompt"}}


def test_a_language_whose_calibration_found_no_gain_runs_plain_unless_alpha_is_asked(router):
    payload = {"prompt": "x", "vllm_xargs": {"language": "tr"}}
    applied = router.route(payload, "completion")
    assert not applied.applied and applied.language == "tur_Latn" and applied.defaults == "calibrated"
    assert "off by default" in applied.reason and "gate not cleared" in applied.reason
    assert "vllm_xargs" not in payload  # a plain request: nothing reaches the engine
    payload = {"prompt": "x", "vllm_xargs": {"language": "tr", "alpha": 0.5}}
    applied = router.route(payload, "completion")
    assert applied.applied and applied.alpha == 0.5 and payload["vllm_xargs"]["language"] == "tur_Latn"


def test_unloaded_language_is_400_listing_loaded_unless_passthrough(router):
    with pytest.raises(RoutingError, match="loaded: est_Latn, ita_Latn, swh_Latn, tur_Latn"):
        router.route({"prompt": "x", "vllm_xargs": {"language": "fra_Latn"}}, "completion")
    payload = {"prompt": "x", "vllm_xargs": {"language": "fr", "on_missing": "passthrough", "alpha": 2}}
    applied = router.route(payload, "completion")
    assert not applied.applied and "fra_Latn" in applied.reason
    assert "vllm_xargs" not in payload  # server-only and steering keys stripped: a plain request


@pytest.mark.parametrize("xargs, message", [
    ({"language": "xx_Nope"}, "unknown language"),
    ({"language": 3}, "must be a string"),
    ({"language": "swh_Latn", "alpha": "big"}, "alpha"),
    ({"language": "swh_Latn", "layers": [5]}, "layers"),
    ({"language": "ita_Latn", "layers": [0]}, "not all in"),
    ({"language": "swh_Latn", "positions": "middle"}, "positions"),
    ({"language": "swh_Latn", "on_missing": "maybe"}, "on_missing"),
    ({"language": "auto", "min_confidence": 3}, "min_confidence"),
    ({"language": "auto-spans", "positions": "all"}, "cannot be combined"),
    ({"language": "swh_Latn", "lingosteer_version": "swh_Latn@0"}, "set by the server"),
])
def test_bad_routing_arguments_are_refused(router, xargs, message):
    with pytest.raises(RoutingError, match=message):
        router.route({"prompt": SWAHILI, "vllm_xargs": xargs}, "completion")


def test_auto_detects_user_turns_of_a_chat(router):
    payload = {"messages": [
        {"role": "system", "content": ENGLISH},
        {"role": "user", "content": [{"type": "text", "text": SWAHILI}]},
    ], "vllm_xargs": {"language": "auto"}}
    applied = router.route(payload, "chat")
    assert applied.applied and applied.language == "swh_Latn" and applied.source == "detected"
    assert applied.confidence > 0.9


def test_auto_without_intervention_or_confidence_runs_plain(router):
    applied = router.route({"prompt": ENGLISH, "vllm_xargs": {"language": "auto"}}, "completion")
    assert not applied.applied and applied.language == "eng_Latn" and "no intervention" in applied.reason
    applied = router.route({"prompt": SWAHILI, "vllm_xargs": {"language": "auto", "min_confidence": 1.0}},
                           "completion")
    assert not applied.applied and "below" in applied.reason


def test_explicit_ranges_travel_flat_past_vllms_xargs_types(router):
    payload = {"prompt": "x", "vllm_xargs": {"language": "swh_Latn", "positions": [[20, 30], [2, 5]]}}
    applied = router.route(payload, "completion")
    assert applied.positions == [[2, 5], [20, 30]]
    assert payload["vllm_xargs"] == {"language": "swh_Latn", "positions": [2, 5, 20, 30]}


def test_text_with_lone_surrogates_is_routed_or_refused_cleanly(router):
    applied = router.route({"prompt": SWAHILI + "\ud800", "vllm_xargs": {"language": "auto"}}, "completion")
    assert applied.language == "swh_Latn"
    with pytest.raises(RoutingError, match="cannot tokenize"):  # a 400, not a crash
        router.route({"prompt": SWAHILI + "\ud800", "vllm_xargs": {"language": "auto-spans"}}, "completion")


def test_server_wide_auto_language(router):
    router.auto_language = True
    assert router.route({"prompt": SWAHILI}, "completion").language == "swh_Latn"
    assert not router.route({"prompt": SWAHILI, "vllm_xargs": {"language": "none"}}, "completion").applied


def _steered_text(tokenizer, ids, ranges):
    return "".join(tokenizer.decode(ids[a:b]) for a, b in ranges)


def test_auto_spans_steer_only_the_swahili_tokens_of_a_completion(router, tokenizer):
    prompt = f"{ENGLISH} {SWAHILI}"
    payload = {"prompt": prompt, "vllm_xargs": {"language": "auto-spans"}}
    applied = router.route(payload, "completion")
    assert applied.applied and applied.language == "swh_Latn" and applied.source == "detected-spans"
    ranges = [list(r) for r in parse_request_spec(payload["vllm_xargs"]).positions]
    assert ranges == [list(s.tokens) for s in applied.spans if s.steered] == applied.positions
    ids = tokenizer(prompt)["input_ids"]
    steered = _steered_text(tokenizer, ids, ranges)
    assert "rafiki yangu" in steered and "weather" not in steered
    assert [s.steered for s in applied.spans] == [False, True]


def test_auto_spans_in_chat_use_the_rendered_template(router, tokenizer):
    messages = [{"role": "user", "content": ITALIAN}, {"role": "assistant", "content": "Ok."},
                {"role": "user", "content": f"{ENGLISH} {ITALIAN}"}]
    payload = {"messages": messages, "vllm_xargs": {"language": "auto-spans"}}
    applied = router.route(payload, "chat")
    rendered = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ranges = [list(r) for r in parse_request_spec(payload["vllm_xargs"]).positions]
    assert applied.language == "ita_Latn" and len(ranges) == 2
    steered = _steered_text(tokenizer, ids, ranges)
    assert steered.count("Buongiorno") == 2 and "weather" not in steered and "<|user|>" not in steered


def test_auto_spans_steer_one_language_and_say_which_were_skipped(router):
    payload = {"prompt": f"{ITALIAN} {SWAHILI} {SWAHILI}", "vllm_xargs": {"language": "auto-spans"}}
    applied = router.route(payload, "completion")
    assert applied.language == "swh_Latn" and "ita_Latn" in applied.reason


def test_paths_must_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    artifact = root / "model" / "swh"
    artifact.mkdir(parents=True)
    for name in ("manifest.json", "matrices.safetensors"):
        (artifact / name).write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    (root / "escape").symlink_to(outside)
    (root / "sneaky").mkdir()
    (root / "sneaky" / "manifest.json").symlink_to(outside / "manifest.json")
    (root / "sneaky" / "matrices.safetensors").write_text("")

    assert resolve_in_root(root, "model/swh") == artifact.resolve()
    assert resolve_in_root(root, str(artifact)) == artifact.resolve()
    for bad in ("../outside", str(outside), "escape", "sneaky", "model/missing", "model/swh/../../../outside"):
        with pytest.raises(ArtifactPathError):
            resolve_in_root(root, bad)


def test_uploads_are_stored_by_content_hash(tmp_path):
    first = store_upload(tmp_path / ".uploads", b"{}", b"abc")
    again = store_upload(tmp_path / ".uploads", b"{}", b"abc")
    other = store_upload(tmp_path / ".uploads", b"{}", b"abd")
    assert first == again != other and first.name == artifact_version(first)  # named as the engine names it
    assert (first / "matrices.safetensors").read_bytes() == b"abc"
    assert not [p for p in (tmp_path / ".uploads").iterdir() if p.name.startswith(".incoming")]
    assert discover_interventions(tmp_path) == {}  # hidden: not preloaded at startup


@pytest.fixture()
def interference_client(tmp_path):
    import numpy as np
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from intervene_server.interference_api import interference_router, read_interference
    from matrix.artifact import InterferenceMatrix, save_interference

    languages = ["swh_Latn", "eng_Latn", "ita_Latn", "zho_Hans"]
    loss = np.array([[4.0, 3.6, 4.4, 4.2], [3.0, 2.0, 2.1, 2.4], [5.0, 4.5, 4.0, 4.8], [6.0, 6.6, 6.3, 6.0]])
    path = save_interference(InterferenceMatrix.from_loss(languages, loss, {"sweep": "unit"}), tmp_path / "i.json")
    app = FastAPI()
    app.include_router(interference_router(read_interference(path)))
    return TestClient(app), languages, loss


def test_interference_routes_serve_the_matrix(interference_client):
    client, languages, loss = interference_client
    whole = client.get("/v1/interference").json()
    assert whole["languages"] == languages and whole["metadata"] == {"sweep": "unit"}
    for a in range(4):
        for b in range(4):
            expected = (loss[a, a] - loss[a, b]) / loss[a, a]
            assert whole["interference"][a][b] == pytest.approx(expected)
    swahili = client.get("/v1/interference/sw").json()  # ISO codes accepted
    assert swahili["row"]["eng_Latn"] == pytest.approx((4.0 - 3.6) / 4.0)
    assert swahili["column"]["eng_Latn"] == pytest.approx((2.0 - 3.0) / 2.0)
    assert swahili["robustness"] == pytest.approx(np.mean([(4 - 3.6) / 4, (4 - 4.4) / 4, (4 - 4.2) / 4]))
    assert client.get("/v1/interference/fra_Latn").status_code == 404
    assert client.get("/v1/interference/xx_Nope").status_code == 404


def test_interference_recommendations_are_ranked_with_reasons(interference_client):
    client, languages, loss = interference_client
    response = client.get("/v1/interference/recommend", params={"target": "swh_Latn", "k": 2}).json()
    assert response["target"] == "swh_Latn" and len(response["recommendations"]) == 2
    interference = (np.diag(loss)[:, None] - loss) / np.diag(loss)[:, None]
    scores = {b: 0.5 * (interference[0, i] + interference[i, 0]) for i, b in enumerate(languages) if i}
    best = sorted(scores, key=scores.get, reverse=True)[:2]
    assert [r["language"] for r in response["recommendations"]] == best
    assert all(r["reason"] for r in response["recommendations"])
    assert client.get("/v1/interference/recommend", params={"target": "swh_Latn", "k": 0}).status_code == 422
    schema = client.get("/openapi.json").json()
    assert {"/v1/interference", "/v1/interference/{language}", "/v1/interference/recommend"} <= set(schema["paths"])


def test_unusable_path_names_are_refused_not_crashed(tmp_path):
    for bad in ("a" * 300, "x/" + "b" * 5000, "nul\x00byte", "lone\ud800surrogate"):
        with pytest.raises(ArtifactPathError):
            resolve_in_root(tmp_path, bad)


@pytest.mark.parametrize("token", [None, "a-long-enough-admin-token"], ids=["no_admin", "admin"])
def test_admin_routes_exist_only_with_a_token(router, tmp_path, token):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from intervene_server.app import ServerOptions, mount

    app = FastAPI()
    mount(app, router.registry, router, ServerOptions(interventions=tmp_path, admin_token=token))
    client = TestClient(app)
    listing = client.get("/v1/interventions").json()["interventions"]
    assert [item["language"] for item in listing] == ["est_Latn", "ita_Latn", "swh_Latn", "tur_Latn"]
    paths = set(client.get("/openapi.json").json()["paths"])
    if token is None:
        assert not any(p.startswith("/admin") for p in paths)
        assert client.post("/admin/interventions", json={"path": "x"}).status_code == 404
    else:
        assert {"/admin/interventions", "/admin/interventions/upload", "/admin/interventions/{language}"} <= paths
        assert client.post("/admin/interventions", json={"path": "x"}).status_code == 401
        wrong = client.delete("/admin/interventions/sw", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = client.post("/admin/interventions", json={"path": "../x"},
                            headers={"Authorization": f"Bearer {token}"})
        assert right.status_code == 400 and "outside" in right.json()["detail"]


@pytest.mark.parametrize("cpu", [True, False])
def test_serve_takes_the_machines_engine_settings_where_the_user_gave_none(cpu, monkeypatch):
    from lingosteer.entrypoints.serve import apply_machine_defaults, build_serve_parser
    from lingosteer import backend

    monkeypatch.setattr(backend, "is_cpu_backend", lambda: cpu)
    monkeypatch.setattr(backend, "cpu_has_native_bfloat16", lambda: False)
    for name in backend.ENVIRONMENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    parser = build_serve_parser()
    plain = parser.parse_args(["m", "--interventions", "x"])
    given = parser.parse_args(["m", "--interventions", "x", "--max-model-len", "4096", "--dtype", "bfloat16"])
    for options in (plain, given):
        options.model = "m"
        apply_machine_defaults(parser, options)
    assert (plain.max_model_len, plain.dtype) == (backend.DEFAULT_MAX_MODEL_LEN, "float32" if cpu else "auto")
    assert (given.max_model_len, given.dtype) == (4096, "bfloat16")
    assert plain.enforce_eager is not cpu  # on a GPU the plugin refuses CUDA graphs


def test_segment_detection_classifies_each_character_at_most_twice(monkeypatch):
    """Merging neighbours must not re-classify the growing segment at every sentence (quadratic)."""
    detector = LanguageDetector()
    classified: list[int] = []
    detect = detector.detect
    monkeypatch.setattr(detector, "detect", lambda text: classified.append(len(text)) or detect(text))
    for repeats in (5, 40):
        classified.clear()
        text = " ".join([SWAHILI] * repeats + [ITALIAN] * repeats)
        segments = detector.detect_segments(text)
        assert [s.detection.language for s in segments] == ["swh_Latn", "ita_Latn"]
        assert len(classified) <= 2 * len(split_sentences(text)) and sum(classified) <= 2 * len(text)


# ---- the routing middleware, driven as an ASGI app -----------------------------------------


def _drive(app, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
    """One POST /v1/completions through `app`: the messages it sent and how many body chunks it read."""
    import asyncio

    chunks = list(body_chunks)
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if not chunks:
            await asyncio.sleep(3600)  # a client waiting for its answer
        read += 1
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, read


def _echo_app(seen: list):
    """Stands in for vLLM's app: records the body and the thread it ran on, answers JSON."""
    import json
    import threading

    async def app(scope, receive, send):
        message = await receive()
        seen.append((json.loads(message["body"]), threading.get_ident()))
        body = b'{"choices": []}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_bodies_over_the_limit_are_413_without_reading_the_rest(router):
    import json

    from intervene_server.middleware import LanguageRoutingMiddleware

    seen = []
    app = LanguageRoutingMiddleware(_echo_app(seen), router, max_request_bytes=1000)
    # Declared too large: answered before a byte of the body is read.
    sent, read = _drive(app, [b"x" * 600] * 100, [(b"content-length", b"60000")])
    assert read == 0 and sent[0]["status"] == 413
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 413 and "1000 bytes" in error["message"] and error["type"] == "Request Entity Too Large"
    # Streamed without a length: reading stops at the chunk that crosses the limit.
    sent, read = _drive(app, [b"x" * 600] * 100, [])
    assert read == 2 and sent[0]["status"] == 413 and not seen
    # Within the limit the request goes through, routed.
    body = json.dumps({"prompt": SWAHILI, "vllm_xargs": {"language": "auto"}}).encode()
    sent, _ = _drive(app, [body[:100], body[100:]], [(b"content-length", str(len(body)).encode())])
    assert sent[0]["status"] == 200 and seen[0][0]["vllm_xargs"]["language"] == "swh_Latn"
    assert json.loads(sent[1]["body"])["lingosteer"]["language"] == "swh_Latn"


def test_routing_runs_off_the_event_loop(router, monkeypatch):
    import json
    import threading

    from intervene_server.middleware import LanguageRoutingMiddleware

    routed_on = []
    route = router.route
    monkeypatch.setattr(router, "route", lambda *a: routed_on.append(threading.get_ident()) or route(*a))
    seen = []
    app = LanguageRoutingMiddleware(_echo_app(seen), router)
    sent, _ = _drive(app, [json.dumps({"prompt": ITALIAN, "vllm_xargs": {"language": "auto-spans"}}).encode()], [])
    [(_, loop_thread)] = seen
    assert sent[0]["status"] == 200 and routed_on and routed_on[0] != loop_thread
    # A routing error still answers 400 in OpenAI's shape from the thread's exception.
    sent, _ = _drive(app, [json.dumps({"prompt": "x", "vllm_xargs": {"language": "xx_Nope"}}).encode()], [])
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["error"]["type"] == "BadRequestError"


# ---- a fleet: `lingosteer interventions push|rm` against several servers --------------------

ADMIN_TOKEN = "a-long-enough-admin-token"


class _WorkerBehindRpc:
    """The engine client's `collective_rpc` without vLLM: the plugin's worker RPC functions,
    called on one worker that holds a real `WorkerState` (artifact validation included)."""

    def __init__(self, model_dir):
        import json
        from types import SimpleNamespace

        import torch

        from intervene_engine.worker_state import WorkerState

        config = json.loads((model_dir / "config.json").read_text())
        state = WorkerState("LlamaForCausalLM", str(model_dir), config["num_hidden_layers"], torch.device("cpu"),
                            max_rows=64, hidden_size=config["hidden_size"])
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(lingosteer_state=state))

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        from intervene_engine import worker_rpc

        return [getattr(worker_rpc, method)(self.worker, *args)]


def _serve_in_thread(app, stack):
    """Serve `app` with uvicorn on a loopback port from a thread until `stack` closes; its URL."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()

    def stop():
        server.should_exit = True
        thread.join()
        sock.close()

    stack.callback(stop)
    while not server.started:
        assert thread.is_alive(), "the in-process server did not start"
        thread.join(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture()
def fleet(router, model_dir, tmp_path):
    """Two servers' lingosteer APIs (no engine): the first's root holds a Swahili artifact, the second's
    is empty. Yields [(url, registry)] and the artifact's directory."""
    from contextlib import ExitStack

    from fastapi import FastAPI

    from intervene_server.app import ServerOptions, mount
    from plugin_support import write_planted_intervention

    artifact = write_planted_intervention(tmp_path / "a" / "llama" / "swh", model_dir, [0, 1], "swh_Latn")
    with ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            root = tmp_path / name
            root.mkdir(exist_ok=True)
            registry = InterventionRegistry(_WorkerBehindRpc(model_dir), root)
            app = FastAPI()
            mount(app, registry, LanguageRouter(registry, router.detector, router.prompt_tokenizer),
                  ServerOptions(interventions=root, admin_token=ADMIN_TOKEN))
            servers.append((_serve_in_thread(app, stack), registry))
        yield servers, artifact


def test_push_and_rm_reach_every_server_of_a_fleet_and_name_those_that_failed(fleet, tmp_path, capsys):
    import socket

    from lingosteer.entrypoints.main import main

    [(first, first_registry), (second, second_registry)], artifact = fleet
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{unused.getsockname()[1]}"  # nothing listens there once closed
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN)
    token_file.chmod(0o600)
    admin = ["--token-file", str(token_file)]

    # By path: only the first server's root holds it; the second refuses it, the third is down.
    code = main(["interventions", "push", "llama/swh", "--server", first, "--server", second, "--server", down, *admin])
    out, err = capsys.readouterr()
    assert code == 2
    assert out.startswith(f"{first}: loaded swh_Latn version ") and second not in out and down not in out
    assert f"{second}: server answered 400" in err and f"{down}: cannot reach" in err
    assert f"push failed on 2 of 3 server(s) ({second}, {down})" in err
    assert list(first_registry.loaded) == ["swh_Latn"] and not second_registry.loaded

    # Uploaded: every server gets the same bytes, so the same version.
    code = main(["interventions", "push", str(artifact), "--upload", "--server", first, "--server", second, *admin])
    out, _ = capsys.readouterr()
    version = first_registry.loaded["swh_Latn"].version
    assert code == 0 and second_registry.loaded["swh_Latn"].version == version
    assert out.splitlines() == [f"{first}: loaded swh_Latn version {version} (replaced {version})",
                                f"{second}: loaded swh_Latn version {version}"]

    assert main(["interventions", "rm", "sw", "--server", first, "--server", second, *admin]) == 0
    assert not first_registry.loaded and not second_registry.loaded
    # A local artifact that cannot be read changes no server.
    assert main(["interventions", "push", str(tmp_path / "missing"), "--upload", "--server", first, *admin]) == 2
    assert not first_registry.loaded


def test_rollback_reloads_the_previous_version_from_its_history_and_409s_without_one(fleet, model_dir, tmp_path,
                                                                                    capsys):
    from lingosteer.entrypoints.main import main
    from plugin_support import write_planted_intervention

    [(first, registry), _], first_artifact = fleet
    write_planted_intervention(first_artifact.parent / "swh_v2", model_dir, [0, 1], "swh_Latn", seed=7)
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN)
    token_file.chmod(0o600)
    admin = ["--server", first, "--token-file", str(token_file)]

    assert main(["interventions", "push", "llama/swh", *admin]) == 0
    original = registry.version_of("swh_Latn")
    assert main(["interventions", "rollback", "swh_Latn", *admin]) == 2  # nothing before it
    assert "server answered 409: swh_Latn has no version loaded before" in capsys.readouterr().err
    assert main(["interventions", "push", "llama/swh_v2", "--pin", *admin]) == 0
    replaced = registry.version_of("swh_Latn")
    assert replaced != original and registry.loaded["swh_Latn"].pinned
    capsys.readouterr()
    assert main(["interventions", "rollback", "sw", *admin]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{first}: rolled swh_Latn back to version {original} (was {replaced})")
    assert registry.version_of("swh_Latn") == original and registry.loaded["swh_Latn"].pinned  # the pin stays
    assert [(entry.version, entry.source, entry.path) for entry in registry.history["swh_Latn"]] == [
        (original, "path", "llama/swh"), (replaced, "path", "llama/swh_v2"), (original, "rollback", "llama/swh")]
    assert registry.history["swh_Latn"][0].loaded_by == "127.0.0.1"


def test_registry_follows_loads_and_unloads_from_their_answers_alone(model_dir, tmp_path):
    """The worker's store is the record; the registry reads it once, then applies each answer
    (no list RPC after a change), replacing its dict so a reader's snapshot never changes."""
    import asyncio

    from intervene_server.registry import LoadError
    from plugin_support import write_planted_intervention

    engine = _WorkerBehindRpc(model_dir)
    store = engine.worker.model_runner.lingosteer_state.store
    store_rpc, methods = engine.collective_rpc, []

    async def counted_rpc(method, args=()):
        methods.append(method)
        return await store_rpc(method, args)

    engine.collective_rpc = counted_rpc
    registry = InterventionRegistry(engine, tmp_path)
    first = write_planted_intervention(tmp_path / "swh", model_dir, [0, 1], "swh_Latn", seed=1)
    second = write_planted_intervention(tmp_path / "swh_v2", model_dir, [0, 1], "swh_Latn", seed=2)

    async def scenario():
        await registry.refresh()
        info, replaced = await registry.load(first)
        assert replaced is None and registry.version_of("swh_Latn") == info.version == store.current["swh_Latn"]
        snapshot = registry.loaded
        info, replaced = await registry.load(second)
        assert replaced == snapshot["swh_Latn"].version != info.version == store.current["swh_Latn"]
        assert snapshot["swh_Latn"].version == replaced  # the earlier snapshot is untouched
        with pytest.raises(LoadError):
            await registry.load(tmp_path / "missing")
        assert registry.version_of("swh_Latn") == info.version
        assert await registry.unload("swh_Latn") == info.version
        assert registry.loaded == {} and store.current == {}

    asyncio.run(scenario())
    assert methods == ["lingosteer_list", "lingosteer_load", "lingosteer_load", "lingosteer_load", "lingosteer_unload"]


def test_identical_uploads_at_once_get_the_answer_of_their_content(model_dir, tmp_path):
    """Identical uploads share one directory: a refused load's clean-up must not delete the files
    an identical upload is about to load (it would be refused as missing, not for its content)."""
    import asyncio
    import json

    import httpx
    from fastapi import FastAPI

    from alignment.artifact import MANIFEST_NAME, MATRICES_NAME
    from intervene_server.artifacts import DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_DIR_NAME
    from intervene_server.interventions_api import admin_router
    from plugin_support import write_planted_intervention

    artifact = write_planted_intervention(tmp_path / "made", model_dir, [0, 1], "swh_Latn")
    manifest = {**json.loads((artifact / MANIFEST_NAME).read_text()), "format_version": 99}  # refused
    files = {"manifest": json.dumps(manifest).encode(), "matrices": (artifact / MATRICES_NAME).read_bytes()}
    root = tmp_path / "root"
    root.mkdir()
    engine = _WorkerBehindRpc(model_dir)
    worker_rpc, loads = engine.collective_rpc, []

    async def scenario():
        first_answered = asyncio.Event()

        async def second_load_after_first_answer(method, args=()):
            loads.append(args[0])
            if len(loads) > 1:  # the first upload's refusal, clean-up included, is over by then
                await first_answered.wait()
            return await worker_rpc(method, args)

        engine.collective_rpc = second_load_after_first_answer
        app = FastAPI()
        app.include_router(admin_router(InterventionRegistry(engine, root), ADMIN_TOKEN, root / UPLOAD_DIR_NAME,
                                        DEFAULT_MAX_UPLOAD_BYTES))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://server") as client:
            async def upload() -> httpx.Response:
                response = await client.post("/admin/interventions/upload", files=files,
                                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                first_answered.set()
                return response

            return await asyncio.gather(upload(), upload())

    responses = asyncio.run(scenario())
    assert len(loads) == 2 and loads[0] == loads[1]  # the same directory, by content hash
    for response in responses:
        assert response.status_code == 422 and "format_version" in response.json()["detail"], response.json()
    assert not list((root / UPLOAD_DIR_NAME).iterdir())  # neither refused upload is kept


def test_the_upload_directory_keeps_only_the_uploads_that_are_loaded(model_dir, tmp_path):
    """An upload's files stay while it is loaded or one rollback away (the version before the current one,
    which the worker may also read again after releasing it to disk); otherwise they are removed: without
    this every hot swap by upload would leave its predecessors on disk for good."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from alignment.artifact import MANIFEST_NAME, MATRICES_NAME
    from intervene_server.artifacts import DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_DIR_NAME
    from intervene_server.interventions_api import admin_router
    from plugin_support import write_planted_intervention

    root = tmp_path / "root"
    uploads = root / UPLOAD_DIR_NAME
    versions = [write_planted_intervention(root / f"swh_v{seed}", model_dir, [0, 1], "swh_Latn", seed=seed)
                for seed in (1, 2, 3)]
    registry = InterventionRegistry(_WorkerBehindRpc(model_dir), root)
    app = FastAPI()
    app.include_router(admin_router(registry, ADMIN_TOKEN, uploads, DEFAULT_MAX_UPLOAD_BYTES))
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def files(artifact):
        return {name: (artifact / file).read_bytes() for name, file in (("manifest", MANIFEST_NAME),
                                                                         ("matrices", MATRICES_NAME))}

    async def scenario() -> list[list[str]]:
        seen = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://server") as client:
            async def upload(artifact):
                response = await client.post("/admin/interventions/upload", files=files(artifact), headers=auth)
                assert response.status_code == 200, response.json()
                return response.json()["loaded"]["path"]

            first = await upload(versions[0])
            seen.append(sorted(p.name for p in uploads.iterdir()))
            second = await upload(versions[1])  # replaces the first, which stays for a rollback
            seen.append(sorted(p.name for p in uploads.iterdir()))
            assert (await upload(versions[1])) == second  # the same upload again keeps its files
            seen.append(sorted(p.name for p in uploads.iterdir()))
            response = await client.post("/admin/interventions", json={"path": "swh_v3"}, headers=auth)
            assert response.status_code == 200, response.json()  # a load by path: the first upload goes
            seen.append(sorted(p.name for p in uploads.iterdir()))
            await upload(versions[0])  # the second goes (the rollback target is now swh_v3)
            seen.append(sorted(p.name for p in uploads.iterdir()))
            assert (await client.delete("/admin/interventions/swh_Latn", headers=auth)).status_code == 200
            seen.append(sorted(p.name for p in uploads.iterdir()))
            return [[first.split("/")[-1]], [second.split("/")[-1]], *seen]

    first, second, *seen = asyncio.run(scenario())
    both = sorted(first + second)
    assert seen == [first, both, both, second, first, []]
    assert all(version.is_dir() for version in versions)  # artifacts in the root itself are never touched


def test_token_prompts_without_bos_get_the_bos_their_tokenizer_adds_to_text(router, tokenizer):
    bos = tokenizer.bos_token_id
    assert tokenizer("a").input_ids[0] == bos  # the tiny model's tokenizer starts text prompts with BOS
    payload = {"model": "tiny", "prompt": [[5, 6], [bos, 7]], "echo": True, "max_tokens": 1}
    applied = router.route(payload, "completion")
    assert payload["prompt"] == [[bos, 5, 6], [bos, 7]] and applied.bos_added == [0]
    payload = {"prompt": [5, 6]}
    assert router.route(payload, "completion").bos_added == [0] and payload["prompt"] == [bos, 5, 6]
    payload = {"prompt": "text", "echo": True}  # vLLM's tokenizer adds it to text
    assert router.route(payload, "completion").bos_added is None and payload["prompt"] == "text"
    with pytest.raises(RoutingError, match="echo with stream"):
        router.route({"prompt": [5, 6], "echo": True, "stream": True}, "completion")


def test_echoed_logprobs_leave_the_added_bos_out():
    from intervene_server.middleware import _drop_echoed_bos

    def choice(index):
        return {"index": index, "logprobs": {
            "tokens": ["<bos>", "a", "b"], "token_logprobs": [None, -1.0, -2.0],
            "top_logprobs": [None, {"a": -1.0}, {"b": -2.0}], "text_offset": [0, 5, 6]}}

    document = {"choices": [choice(0), choice(1)]}
    _drop_echoed_bos(document, frozenset({1}))
    assert document["choices"][0] == choice(0)
    assert document["choices"][1]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                                   "top_logprobs": [{"a": -1.0}, {"b": -2.0}], "text_offset": [5, 6]}


def test_an_artifact_added_under_the_root_after_start_is_loaded_by_the_first_request_for_it(
        router, model_dir, tmp_path, monkeypatch):
    """As vLLM's filesystem LoRA resolver: a request naming a language whose artifact appeared under the root
    after start loads it, then is steered; a language with none keeps its 404 / 400; an admin unload sticks."""
    import asyncio
    import json

    import httpx

    from intervene_server import registry as registry_module
    from intervene_server.middleware import LanguageRoutingMiddleware
    from lingosteer.fingerprint import model_fingerprint
    from plugin_support import write_planted_intervention

    async def echo_body(scope, receive, send):  # stands in for vLLM: answers with the body it was sent
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"sent": json.loads(body)}).encode()})

    root = tmp_path / "root"
    root.mkdir()
    registry = InterventionRegistry(_WorkerBehindRpc(model_dir), root, model_fingerprint(model_dir))
    app = LanguageRoutingMiddleware(echo_body, LanguageRouter(registry, router.detector, router.prompt_tokenizer,
                                                              served_models=("tiny",)))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://server") as client:
            def complete(model, xargs=None):
                return client.post("/v1/completions", json={"model": model, "prompt": "x",
                                                            **({"vllm_xargs": xargs} if xargs else {})})

            assert (await complete("tiny:swh_Latn")).status_code == 404  # nothing under the root yet
            write_planted_intervention(root / "swh", model_dir, [0, 1], "swh_Latn")
            assert (await complete("tiny:swh_Latn")).status_code == 404  # looked for moments ago: not again yet
            monkeypatch.setattr(registry_module, "FIRST_USE_RETRY_SECONDS", 0.0)
            response = await complete("tiny:swh_Latn")
            assert response.status_code == 200, response.text
            assert response.json()["sent"]["vllm_xargs"] == {"language": "swh_Latn"}

            (root / "broken").mkdir()  # other languages' bad manifests and second versions do not stop the lookup
            (root / "broken" / "manifest.json").write_text("{}")
            write_planted_intervention(root / "swh_v2", model_dir, [0, 1], "swh_Latn", seed=7)
            write_planted_intervention(root / "ita", model_dir, [1], "ita_Latn", seed=2)
            both = await asyncio.gather(*(complete("tiny", {"language": "it"}) for _ in range(3)))
            assert [r.status_code for r in both] == [200] * 3 and len(registry.history["ita_Latn"]) == 1

            fresh = await complete("tiny", {"language": "fra_Latn"})  # no artifact: the usual 400
            assert fresh.status_code == 400 and "loaded: ita_Latn, swh_Latn" in fresh.json()["error"]["message"]
            await registry.unload("ita_Latn")  # an admin's unload is not undone by the next request
            assert (await complete("tiny", {"language": "it"})).status_code == 400

    asyncio.run(scenario())
    assert [entry.source for entry in registry.history["swh_Latn"]] == ["first-use"]
    assert registry.history["swh_Latn"][0].loaded_by == "first use"
