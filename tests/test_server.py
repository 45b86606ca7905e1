"""`lingosteer serve` end to end: a real server process on loopback, the official `openai` client.

One server (tiny Llama, fp32, eager) for the whole module. The plain-vLLM baseline
runs first, in its own process with VLLM_PLUGINS="", and exits before the server
starts: one engine at a time on this machine.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from plugin_support import run_plain_vllm, write_planted_intervention

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
MAX_TOKENS = 8
# Streamed requests that are in flight across the hot swap (prompt + LONG_TOKENS <
# max_model_len). The swap and the tokens both take engine steps, so the margin does
# not depend on the CPU: here the swap returned after ~150 of their tokens.
LONG_TOKENS = 1800
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SWAHILI = [
    "Habari ya asubuhi, rafiki yangu. Leo tunazungumza kuhusu elimu.",
    "Watoto wanakwenda shuleni kila siku asubuhi na mapema.",
    "Mvua kubwa ilinyesha jana usiku katika mji wa Mombasa.",
    "Wakulima wengi hupanda mahindi na maharage msimu huu.",
]
ITALIAN = [
    "Buongiorno a tutti, oggi parliamo della scuola e della salute.",
    "Il treno per Milano parte alle otto di mattina dalla stazione centrale.",
]
PLAIN = [
    "The weather in the mountains was cold and windy all week long.",
    "Bonjour à tous, nous parlons aujourd'hui de la santé publique.",
    "Die Kinder spielen im Garten, während die Eltern kochen.",
    "Habari ya jioni, tutaonana kesho asubuhi sokoni.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dir, tiny_model_dir):
    """Interventions root: swh and ita preloaded, a second swh version staged (hidden: not preloaded),
    and a Qwen2 artifact (another model: skipped at start)."""
    root = tmp_path_factory.mktemp("interventions")
    write_planted_intervention(root / "llama" / "swh", model_dir, [0, 1], "swh_Latn", seed=1)
    write_planted_intervention(root / "llama" / "ita", model_dir, [1], "ita_Latn", seed=2, default_alpha=0.7)
    write_planted_intervention(root / ".staged" / "swh_v2", model_dir, [0, 1], "swh_Latn", seed=3)
    write_planted_intervention(root / "qwen2" / "swh", tiny_model_dir("qwen2"), [0], "swh_Latn", seed=4)
    return root


@pytest.fixture(scope="module")
def plain_reference(model_dir):
    """Greedy tokens and logprobs of PLAIN from vLLM with every plugin disabled."""
    sampling = dict(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
    return dict(zip(PLAIN, run_plain_vllm(model_dir, PLAIN, ENGINE, sampling)))


@pytest.fixture(scope="module")
def server(plain_reference, model_dir, root, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    (work / "chat.jinja").write_text(CHAT_TEMPLATE)
    token = "test-admin-token-0123456789"
    (work / "token").write_text(token + "\n")
    (work / "token").chmod(0o600)
    from matrix.artifact import InterferenceMatrix, save_interference

    loss = [[4.0, 3.6, 4.4], [3.0, 2.0, 2.1], [5.0, 4.5, 4.0]]
    save_interference(InterferenceMatrix.from_loss(["swh_Latn", "eng_Latn", "ita_Latn"], loss), work / "i.json")
    port = free_port()
    command = [
        sys.executable, "-m", "lingosteer.entrypoints.main", "serve", str(model_dir), "--interventions", str(root),
        "--admin-token-file", str(work / "token"), "--chat-template", str(work / "chat.jinja"),
        "--interference", str(work / "i.json"), "--max-upload-mb", "1", "--host", "127.0.0.1", "--port", str(port),
        *ENGINE_FLAGS,
    ]
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{(work / 'server.log').read_text()[-5000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{(work / 'server.log').read_text()[-5000:]}")
            time.sleep(2)
        yield {"base": base, "token": token, "log": work / "server.log", "token_file": work / "token"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture()
def admin(server):
    with httpx.Client(base_url=server["base"], headers={"Authorization": f"Bearer {server['token']}"},
                      timeout=120) as http:
        yield http


def complete(client, model, prompt, xargs=None, max_tokens=MAX_TOKENS, ignore_eos=False):
    """A greedy completion: (token ids, logprobs, lingosteer field, header)."""
    extra = {"return_tokens_as_token_ids": True, **({"ignore_eos": True} if ignore_eos else {})}
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=extra
    )
    completion = raw.parse()
    return summarize(completion), completion.model_extra["lingosteer"], json.loads(raw.headers["x-lingosteer-applied"])


def summarize(completion) -> dict:
    logprobs = completion.choices[0].logprobs
    return {"tokens": [int(t.removeprefix("token_id:")) for t in logprobs.tokens],
            "logprobs": logprobs.token_logprobs}


def assert_same_generation(actual: dict, expected: dict, tolerance: float = 1e-4) -> None:
    assert actual["tokens"] == expected["tokens"]
    assert max(abs(a - b) for a, b in zip(actual["logprobs"], expected["logprobs"])) <= tolerance


def loaded(server) -> dict:
    listing = httpx.get(server["base"] + "/v1/interventions").json()["interventions"]
    return {item["language"]: item for item in listing}


# ---- routing over the OpenAI API -------------------------------------------------------------


def test_preloads_this_models_artifacts_only(server):
    interventions = loaded(server)
    assert set(interventions) == {"swh_Latn", "ita_Latn"}
    assert interventions["swh_Latn"]["path"] == "llama/swh" and interventions["swh_Latn"]["layers"] == [0, 1]
    assert interventions["ita_Latn"]["serving"]["alpha"] == 0.7
    assert interventions["swh_Latn"]["memory_bytes"] == 2 * (128 * 128 + 128) * 4


def test_completion_plain_equals_plain_vllm_and_says_none(client, model_name, plain_reference):
    generation, field, header = complete(client, model_name, PLAIN[0])
    assert_same_generation(generation, plain_reference[PLAIN[0]], tolerance=0.0)
    assert field == header and field["applied"] is False and field["source"] == "none"


def test_completion_with_explicit_iso_code(client, model_name, server):
    plain, _, _ = complete(client, model_name, SWAHILI[0])
    steered, field, header = complete(client, model_name, SWAHILI[0], {"language": "sw", "alpha": 0.8})
    assert field == header
    assert field["applied"] and field["language"] == "swh_Latn" and field["source"] == "explicit"
    assert field["version"] == loaded(server)["swh_Latn"]["version"]
    assert field["alpha"] == 0.8 and field["layers"] == [0, 1] and field["positions"] == "last"
    assert steered["logprobs"] != plain["logprobs"]


def test_unloaded_language_400_lists_loaded_unless_passthrough(client, model_name, plain_reference):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="loaded: ita_Latn, swh_Latn"):
        complete(client, model_name, PLAIN[1], {"language": "fra_Latn"})
    generation, field, _ = complete(client, model_name, PLAIN[1], {"language": "fr", "on_missing": "passthrough"})
    assert field["applied"] is False and "fra_Latn" in field["reason"]
    assert_same_generation(generation, plain_reference[PLAIN[1]], tolerance=0.0)


def test_auto_detects_language_of_the_prompt(client, model_name):
    explicit, _, _ = complete(client, model_name, ITALIAN[0], {"language": "ita_Latn"})
    detected, field, _ = complete(client, model_name, ITALIAN[0], {"language": "auto"})
    assert field["applied"] and field["source"] == "detected" and field["language"] == "ita_Latn"
    assert field["confidence"] > 0.9
    assert_same_generation(detected, explicit, tolerance=0.0)
    _, english, _ = complete(client, model_name, PLAIN[0], {"language": "auto"})
    assert english["applied"] is False and english["language"] == "eng_Latn"


def test_auto_spans_tokens_match_vllm_and_steer_exactly_those_ranges(client, model_name, server):
    prompt = f"{PLAIN[0]} {SWAHILI[0]}"
    spans, field, _ = complete(client, model_name, prompt, {"language": "auto-spans"})
    assert field["applied"] and field["language"] == "swh_Latn" and field["source"] == "detected-spans"
    ranges = [span["tokens"] for span in field["spans"] if span["steered"]]
    assert ranges and field["positions"] == ranges
    # The token ranges index the prompt exactly as vLLM tokenizes it.
    ids = httpx.post(server["base"] + "/tokenize", json={"model": model_name, "prompt": prompt}).json()["tokens"]
    english_tokens = httpx.post(server["base"] + "/tokenize", json={
        "model": model_name, "prompt": PLAIN[0]}).json()["tokens"]
    assert ranges[0][0] == len(english_tokens) and ranges[-1][1] == len(ids)
    explicit, _, _ = complete(client, model_name, prompt, {"language": "swh_Latn", "positions": ranges})
    assert_same_generation(spans, explicit, tolerance=0.0)


def test_chat_with_and_without_intervention_and_auto_on_user_turns(client, model_name, server):
    messages = [{"role": "system", "content": PLAIN[0]}, {"role": "user", "content": SWAHILI[1]}]

    def chat(xargs=None):
        raw = client.chat.completions.with_raw_response.create(
            model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )
        response = raw.parse()
        lp = [entry.logprob for entry in response.choices[0].logprobs.content]
        return response.choices[0].message.content, lp, response.model_extra["lingosteer"], raw.headers

    plain_text, plain_lp, plain_field, _ = chat()
    text, lp, field, headers = chat({"language": "swh_Latn", "positions": "prompt"})
    assert plain_field["applied"] is False and field["applied"] and field["positions"] == "prompt"
    assert json.loads(headers["x-lingosteer-applied"]) == field
    assert lp != plain_lp
    _, auto_lp, auto_field, _ = chat({"language": "auto", "positions": "prompt"})
    assert auto_field["language"] == "swh_Latn" and auto_lp == lp  # detected from the user turn


def test_chat_auto_spans_match_vllm_chat_tokenization(client, model_name, server):
    messages = [{"role": "user", "content": f"{PLAIN[0]} {ITALIAN[1]}"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"vllm_xargs": {"language": "auto-spans"}},
    )
    field = raw.parse().model_extra["lingosteer"]
    [steered] = [span for span in field["spans"] if span["steered"]]
    tokenize = httpx.post(server["base"] + "/tokenize", json={
        "model": model_name, "messages": messages, "add_generation_prompt": True,
        "return_token_strs": True}).json()
    text = "".join(tokenize["token_strs"][steered["tokens"][0]:steered["tokens"][1]]).replace("Ġ", " ")
    assert ITALIAN[1].rstrip(".") in text and "weather" not in text and "<|" not in text


@pytest.mark.parametrize("xargs", [None, {"language": "swh_Latn", "positions": "all"}], ids=["plain", "steered"])
def test_streaming_matches_non_streaming_and_ends_with_lingosteer_chunk(client, model_name, xargs):
    messages = [{"role": "user", "content": SWAHILI[2]}]
    extra = {"vllm_xargs": xargs} if xargs else None
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body=extra)
    with client.chat.completions.with_streaming_response.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=extra,
    ) as response:
        header = json.loads(response.headers["x-lingosteer-applied"])
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = chunks[-1]
    assert final.choices == [] and final.model_extra["lingosteer"] == header == whole.model_extra["lingosteer"]
    assert header["applied"] is (xargs is not None)
    if xargs:
        assert header["version"]  # known before the first byte of the stream


def test_streaming_completion_with_intervention(client, model_name):
    stream = client.completions.create(model=model_name, prompt=ITALIAN[1], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, extra_body={"vllm_xargs": {"language": "it"}})
    chunks = list(stream)
    assert chunks[-1].model_extra["lingosteer"]["language"] == "ita_Latn"
    whole = client.completions.create(model=model_name, prompt=ITALIAN[1], max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"vllm_xargs": {"language": "it"}})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


# ---- concurrency and hot swap ----------------------------------------------------------------


def _mixed_requests(n: int) -> list[tuple[str, dict | None]]:
    kinds = [(p, {"language": "swh_Latn"}) for p in SWAHILI] + [(p, {"language": "it"}) for p in ITALIAN] \
        + [(SWAHILI[0], {"language": "auto"})] + [(p, None) for p in PLAIN]
    return [kinds[i % len(kinds)] for i in range(n)]


def _async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=600)


def _launch(client, model_name, requests, steered_tokens=MAX_TOKENS) -> list[asyncio.Task]:
    """Start every request at once; each task gives (generation, lingosteer field)."""
    async def one(prompt, xargs):
        extra = {"return_tokens_as_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})}
        completion = await client.completions.create(
            model=model_name, prompt=prompt, max_tokens=steered_tokens if xargs else MAX_TOKENS,
            temperature=0, logprobs=1, extra_body=extra)
        return summarize(completion), completion.model_extra["lingosteer"]

    return [asyncio.create_task(one(p, x)) for p, x in requests]


async def _run_concurrently(server, model_name, requests):
    client = _async_client(server)
    results = await asyncio.gather(*_launch(client, model_name, requests), return_exceptions=True)
    await client.close()
    return results


def test_concurrent_mixed_load_has_no_errors_and_plain_equals_plain_vllm(server, model_name, plain_reference):
    requests = _mixed_requests(72)
    results = asyncio.run(_run_concurrently(server, model_name, requests))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    versions = {language: item["version"] for language, item in loaded(server).items()}
    alone: dict[tuple, dict] = {}
    for (prompt, xargs), (generation, field) in zip(requests, results):
        if xargs is None:
            assert field["applied"] is False
            assert_same_generation(generation, plain_reference[prompt], tolerance=1e-5)
            continue
        assert field["applied"] and field["version"] == versions[field["language"]]
        key = (prompt, json.dumps(xargs))
        alone.setdefault(key, generation)
        assert_same_generation(generation, alone[key])  # the same request gives the same result in any batch
    assert {f["language"] for _, f in results if f["applied"]} == {"swh_Latn", "ita_Latn"}


class _LongStream:
    """A streamed greedy completion of LONG_TOKENS tokens whose progress is readable while it runs."""

    def __init__(self, client, model_name, prompt: str, xargs: dict | None):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.field: dict | None = None
        self.first_token = asyncio.Event()
        self.task = asyncio.create_task(self._run(client, model_name, prompt, xargs))

    async def _run(self, client, model_name, prompt, xargs):
        extra = {"return_tokens_as_token_ids": True, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
        try:
            stream = await client.completions.create(model=model_name, prompt=prompt, max_tokens=LONG_TOKENS,
                                                     temperature=0, logprobs=1, stream=True, extra_body=extra)
            async for chunk in stream:
                if not chunk.choices:  # lingosteer's closing chunk
                    self.field = chunk.model_extra["lingosteer"]
                elif chunk.choices[0].logprobs is not None:
                    self.tokens += [int(t.removeprefix("token_id:")) for t in chunk.choices[0].logprobs.tokens]
                    self.logprobs += chunk.choices[0].logprobs.token_logprobs
                    if self.tokens:
                        self.first_token.set()
        finally:
            self.first_token.set()  # a failed stream wakes its waiter too; its task holds the error
        return {"tokens": self.tokens, "logprobs": self.logprobs}, self.field


def test_hot_swap_during_load_no_failures_and_no_mixed_requests(server, client, model_name, admin, plain_reference):
    """Streams that have delivered their first token when the swap is sent, and not their last when it
    returns, are in flight across it on any machine: the test checks exactly that (no gauge, no timing)."""
    long = 32  # tokens of the short steered requests
    long_requests = [(SWAHILI[0], {"language": "swh_Latn"}), (SWAHILI[1], {"language": "swh_Latn"}), (PLAIN[0], None)]
    expected, expected_long = {}, {}
    for version_path in ("llama/swh", ".staged/swh_v2"):
        info = admin.post("/admin/interventions", json={"path": version_path}).json()["loaded"]
        expected[info["version"]] = {
            p: complete(client, model_name, p, {"language": "swh_Latn"}, max_tokens=long)[0] for p in SWAHILI}
        expected_long[info["version"]] = {
            p: complete(client, model_name, p, x, max_tokens=LONG_TOKENS, ignore_eos=True)[0]
            for p, x in long_requests if x}
    old, new = list(expected)
    assert admin.post("/admin/interventions", json={"path": "llama/swh"}).status_code == 200
    assert any(expected[old][p]["tokens"] != expected[new][p]["tokens"] or
               expected[old][p]["logprobs"] != expected[new][p]["logprobs"] for p in SWAHILI)

    def make_requests(n, offset):
        return [(SWAHILI[i % 4], {"language": "swh_Latn"}) if i % 3 else (PLAIN[i % 4], None)
                for i in range(offset, offset + n)]

    async def load_with_swap():
        """The long streams and wave 1 run when the swap is sent; wave 2 arrives during it; wave 3 after."""
        client = _async_client(server)
        streams = [_LongStream(client, model_name, p, x) for p, x in long_requests]
        wave1 = _launch(client, model_name, make_requests(36, 0), long)
        await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in streams)), timeout=600)
        tokens_when_sent = [len(s.tokens) for s in streams]
        swap = asyncio.create_task(asyncio.to_thread(
            admin.post, "/admin/interventions", json={"path": ".staged/swh_v2"}))
        wave2 = _launch(client, model_name, make_requests(24, 36), long)
        swap_response = await swap
        tokens_when_returned = [len(s.tokens) for s in streams]
        wave3 = _launch(client, model_name, make_requests(9, 60), long)
        results = await asyncio.gather(*wave1, *wave2, *wave3, return_exceptions=True)
        long_results = await asyncio.gather(*(s.task for s in streams), return_exceptions=True)
        await client.close()
        return swap_response, tokens_when_sent, tokens_when_returned, results, long_results

    all_requests = make_requests(69, 0)
    try:
        swap_response, tokens_when_sent, tokens_when_returned, results, long_results = asyncio.run(load_with_swap())
    finally:
        assert admin.post("/admin/interventions", json={"path": "llama/swh"}).status_code == 200
    assert swap_response.status_code == 200 and swap_response.json()["replaced_version"] == old
    errors = [r for r in results + long_results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    # The swap really happened while every long stream was generating.
    assert all(n > 0 for n in tokens_when_sent), tokens_when_sent
    assert all(n < LONG_TOKENS for n in tokens_when_returned), tokens_when_returned
    for (prompt, xargs), (generation, field) in zip(long_requests, long_results):
        assert len(generation["tokens"]) == LONG_TOKENS
        if xargs is None:
            reference = plain_reference[prompt]
            prefix = {key: values[:len(reference["tokens"])] for key, values in generation.items()}
            assert field["applied"] is False
            assert_same_generation(prefix, reference, tolerance=1e-5)
        else:  # started before the swap: the old version, for every one of its tokens
            assert field["version"] == old
            assert_same_generation(generation, expected_long[old][prompt])
    seen = set()
    for (prompt, xargs), (generation, field) in zip(all_requests, results):
        if xargs is None:
            assert_same_generation(generation, plain_reference[prompt], tolerance=1e-5)
            continue
        seen.add(field["version"])
        # Each request ran wholly on the version it reports.
        assert_same_generation(generation, expected[field["version"]][prompt])
    assert seen == {old, new}


# ---- admin API --------------------------------------------------------------------------------


def test_admin_auth(server):
    url = server["base"] + "/admin/interventions"
    body = {"path": "llama/ita"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong-token"}).status_code == 403
    assert httpx.post(url, json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    assert httpx.delete(url + "/ita_Latn").status_code == 401
    good = httpx.post(url, json=body, headers={"Authorization": f"Bearer {server['token']}"}, timeout=120)
    assert good.status_code == 200 and good.json()["loaded"]["language"] == "ita_Latn"
    audit = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith('{"action"')]
    assert {"denied", "swap"} <= {entry["action"] for entry in audit}


def _corrupt(root: Path, name: str, edit_manifest=None, edit_tensors=None, raw_matrices=None) -> str:
    target = root / "bad" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "llama" / "swh", target)
    if edit_manifest:
        manifest = json.loads((target / "manifest.json").read_text())
        edit_manifest(manifest)
        (target / "manifest.json").write_text(json.dumps(manifest))
    if edit_tensors:
        save_file(edit_tensors(load_file(target / "matrices.safetensors")), target / "matrices.safetensors")
    if raw_matrices is not None:
        (target / "matrices.safetensors").write_bytes(raw_matrices)
    return f"bad/{name}"


BAD_LOADS = {
    "other_model": (lambda root: "qwen2/swh", 422, "different model"),
    "hidden_size": (lambda root: _corrupt(root, "hidden", edit_tensors=lambda t: {
        k: (v[..., :64] if k.startswith("b.") else v[:64, :64]).contiguous() for k, v in t.items()}),
        422, "shape|hidden"),
    "layer_count": (lambda root: _corrupt(root, "layers", edit_manifest=lambda m: m.update(layers=[0, 7]),
                                          edit_tensors=lambda t: {k.replace(".1", ".7"): v for k, v in t.items()}),
                    422, "layers"),
    "fingerprint": (lambda root: _corrupt(root, "fingerprint", edit_manifest=lambda m: m["model"].update(
        tokenizer_sha256="0" * 64)), 422, "different model"),
    "non_finite": (lambda root: _corrupt(root, "nan", edit_tensors=lambda t: {
        k: v * float("nan") if k.startswith("b.") else v for k, v in t.items()}), 422, "NaN|finite"),
    "pickle": (lambda root: _corrupt(root, "pickle", raw_matrices=b"\x80\x04\x95" + b"\x00" * 64), 422,
               "safetensors"),
    "traversal": (lambda root: "../../etc", 400, "outside"),
    "symlink": (lambda root: _symlink_out(root), 400, "outside"),
    "missing": (lambda root: "llama/nope", 400, "not a directory"),
}


def _symlink_out(root: Path) -> str:
    link = root / "bad" / "link"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(root.parent)
    return "bad/link"


@pytest.mark.parametrize("case", BAD_LOADS)
def test_bad_load_refused_old_version_keeps_serving(case, server, root, admin, client, model_name):
    make_path, status, message = BAD_LOADS[case]
    before = loaded(server)
    [generation_before, field_before, _] = complete(client, model_name, SWAHILI[0], {"language": "swh_Latn"})
    response = admin.post("/admin/interventions", json={"path": make_path(root)})
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]["message"], flags=re.I)
    assert loaded(server) == before
    generation, field, _ = complete(client, model_name, SWAHILI[0], {"language": "swh_Latn"})
    assert field["version"] == field_before["version"]
    assert_same_generation(generation, generation_before, tolerance=0.0)


def test_upload_loads_an_artifact_and_limits_size(server, root, admin, client, model_name):
    source = root / ".staged" / "swh_v2"
    files = {name: (name, (source / f).read_bytes())
             for name, f in (("manifest", "manifest.json"), ("matrices", "matrices.safetensors"))}
    try:
        response = admin.post("/admin/interventions/upload", files=files)
        assert response.status_code == 200, response.text
        info = response.json()["loaded"]
        assert info["language"] == "swh_Latn" and info["path"].startswith(".uploads/")
        assert loaded(server)["swh_Latn"]["version"] == info["version"]
        too_big = {"manifest": files["manifest"], "matrices": ("matrices", b"\0" * (2 << 20))}
        assert admin.post("/admin/interventions/upload", files=too_big).status_code == 413
        assert admin.post("/admin/interventions/upload", files={"manifest": files["manifest"]}).status_code == 400
    finally:
        assert admin.post("/admin/interventions", json={"path": "llama/swh"}).status_code == 200


def test_unload_then_400_then_reload(server, admin, client, model_name):
    from openai import BadRequestError

    assert admin.delete("/admin/interventions/xx_Nope").status_code == 404
    response = admin.delete("/admin/interventions/it")
    assert response.status_code == 200 and response.json()["language"] == "ita_Latn"
    assert admin.delete("/admin/interventions/ita_Latn").status_code == 404
    with pytest.raises(BadRequestError, match="loaded: swh_Latn"):
        complete(client, model_name, ITALIAN[0], {"language": "ita_Latn"})
    assert admin.post("/admin/interventions", json={"path": "llama/ita"}).status_code == 200


def test_an_artifact_added_under_the_root_while_serving_is_loaded_by_its_first_request(
        server, root, admin, client, model_name, model_dir):
    """No push needed (as vLLM's filesystem LoRA resolver): the first request for its language loads it."""
    import shutil

    added = write_planted_intervention(root / "llama" / "fra", model_dir, [1], "fra_Latn", seed=5)
    try:
        _, field, header = complete(client, f"{model_name}:fra_Latn", ITALIAN[0])
        assert field == header and field["applied"] and field["language"] == "fra_Latn"
        history = admin.get("/admin/interventions/fra_Latn/history").json()
        assert [(entry["source"], entry["loaded_by"]) for entry in history] == [("first-use", "first use")]
        assert f"{model_name}:fra_Latn" in {card.id for card in client.models.list().data}
    finally:
        admin.delete("/admin/interventions/fra_Latn")
        shutil.rmtree(added)


def test_interventions_cli_drives_the_api(server, capsys):
    from lingosteer.entrypoints.main import main

    common = ["--server", server["base"]]
    assert main(["interventions", "list", *common]) == 0
    listed = capsys.readouterr().out
    assert "swh_Latn" in listed and "default alpha=0.7 last (uncalibrated)" in listed  # ita's manifest alpha
    listing = httpx.get(server["base"] + "/v1/interventions").json()["interventions"]
    ita = next(item for item in listing if item["language"] == "ita_Latn")
    assert ita["serving"] == {"alpha": 0.7, "layers": [1], "positions": "last"} and ita["evidence"] is None
    admin = [*common, "--token-file", str(server["token_file"])]
    assert main(["interventions", "rm", "ita_Latn", *admin]) == 0
    assert "unloaded ita_Latn" in capsys.readouterr().out
    assert main(["interventions", "push", "llama/ita", *admin]) == 0
    assert "loaded ita_Latn" in capsys.readouterr().out
    assert main(["interventions", "push", "../x", *admin]) == 2
    assert "400" in capsys.readouterr().err
    assert main(["interventions", "rm", "ita_Latn", *common]) == 2  # no token
    assert "401" in capsys.readouterr().err


def counter_values(base: str, counters: dict[str, tuple[str, dict]]) -> dict[str, float]:
    """For each key, the sum of the /metrics samples named `name` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics").text
    assert "vllm:" in text  # vLLM's own metrics are still there
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return {key: sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())
            for key, (name, labels) in counters.items()}


def test_metrics_count_requests_detections_and_swaps(server, admin, client, model_name):
    """Each counter moves by exactly what this test does, whatever ran before it."""
    counters = {
        "steered swh_Latn requests": ("lingosteer_requests_total", {"language": "swh_Latn"}),
        "steered detections": ("lingosteer_language_detections_total", {"outcome": "steered"}),
        "swh_Latn swaps": ("lingosteer_intervention_events_total", {"event": "swap", "language": "swh_Latn"}),
        "rejected loads": ("lingosteer_intervention_events_total", {"event": "rejected"}),
    }
    for path in ("llama/swh", "llama/ita"):  # loaded now (load or swap), whatever an earlier test unloaded
        assert admin.post("/admin/interventions", json={"path": path}).status_code == 200
    before = counter_values(server["base"], counters)
    assert admin.post("/admin/interventions", json={"path": "llama/swh"}).status_code == 200
    assert admin.post("/admin/interventions", json={"path": "qwen2/swh"}).status_code == 422  # another model's
    complete(client, model_name, SWAHILI[0], {"language": "swh_Latn"})
    _, detected, _ = complete(client, model_name, ITALIAN[0], {"language": "auto"})
    assert detected["applied"] and detected["source"] == "detected"
    # A request is counted once its response is sent: poll briefly rather than race it.
    expected = dict.fromkeys(counters, 1.0)
    deadline = time.monotonic() + 10
    while True:
        after = counter_values(server["base"], counters)
        moved = {key: after[key] - before[key] for key in counters}
        if moved == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert moved == expected


def test_interference_routes_are_served(server):
    base = server["base"]
    assert httpx.get(base + "/v1/interference").json()["languages"] == ["swh_Latn", "eng_Latn", "ita_Latn"]
    assert httpx.get(base + "/v1/interference/sw").json()["row"]["eng_Latn"] == pytest.approx(0.1)
    ranked = httpx.get(base + "/v1/interference/recommend", params={"target": "swh_Latn", "k": 1}).json()
    # eng: (0.1 + -0.5) / 2 = -0.2; ita: (-0.1 + -0.25) / 2 = -0.175 -> ita first
    assert [r["language"] for r in ranked["recommendations"]] == ["ita_Latn"]


# ---- fuzzing our routes (last: it may change what is loaded) -------------------------------


def test_openapi_of_our_routes_fuzzed_without_server_errors(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json").include(
        path_regex=r"^/(v1/interventions|admin/|v1/interference)")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/interventions", "/admin/interventions",
                                             "/admin/interventions/{language}", "/admin/interventions/upload"}
    headers = {"Authorization": f"Bearer {server['token']}"}
    for operation in operations:
        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(base_url=server["base"], headers=headers, timeout=60)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"

        fuzz()


# ---- languages as model names; lm-eval's local-completions against the server ----------------


def test_languages_are_models_with_parent_base(client, model_name, server):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {model_name, f"{model_name}:ita_Latn", f"{model_name}:swh_Latn"}
    italian = cards[f"{model_name}:ita_Latn"].model_extra
    assert italian["parent"] == model_name and italian["lingosteer"]["version"] == loaded(server)["ita_Latn"]["version"]
    assert italian["lingosteer"]["serving"]["alpha"] == 0.7


def test_a_language_model_name_steers_as_vllm_xargs_do(client, model_name):
    from openai import NotFoundError

    explicit, _, _ = complete(client, model_name, ITALIAN[1], {"language": "ita_Latn"})
    named, field, header = complete(client, f"{model_name}:ita_Latn", ITALIAN[1])
    assert field == header and field["applied"] and field["language"] == "ita_Latn" and field["alpha"] == 0.7
    assert_same_generation(named, explicit, tolerance=0.0)
    with pytest.raises(NotFoundError, match=f"models: {model_name}, {model_name}:ita_Latn"):
        complete(client, f"{model_name}:fra_Latn", ITALIAN[1])


# lm-eval's local-completions scores a log-likelihood request as one echoed prompt (context and continuation)
# and slices the continuation's log-probabilities itself. Its numbers are compared with `lingosteer bench`'s
# reference scorer (`evaluation.scoring.score_with_hf`: HF transformers, bench's token split and steered
# positions), which needs no second engine beside the server; tests/test_lmeval_backend.py and
# tests/test_evaluation.py tie the `lingosteer` lm-eval model and bench's vLLM scorer to the same numbers.
LMEVAL_ITEMS = 4
LMEVAL_TASKS = ("xcopa_sw", "xnli_sw")  # lm-eval's own definitions, on the local files
EVERY_TOKEN = {"alpha": 1.0, "layers": (0, 1), "positions": "all"}  # serving defaults the same on both paths
# vLLM and HF transformers sum a few dozen fp32 log-probabilities each (tests/test_evaluation.py's bound)
HF_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, data_dir) -> Path:
    """lm-eval's own XCOPA / XNLI tasks, their items from the local files (`lingosteer lm-eval-tasks`)."""
    from evaluation.lmeval_tasks import write_local_tasks

    out = tmp_path_factory.mktemp("lm-eval-tasks")
    write_local_tasks(data_dir, out)
    return out


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from alignment.hidden_states import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir)[0]


def local_completions(server, model: str, model_dir, local_tasks: Path, tasks) -> dict:
    """lm-eval's `local-completions` against the server on `tasks`' first LMEVAL_ITEMS items, with lm-eval's
    defaults (add_bos_token=False: its token-id prompts get their BOS from the server)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = dict(model=model, base_url=server["base"] + "/v1/completions", tokenizer=str(model_dir),
                tokenizer_backend="huggingface", num_concurrent=1, max_retries=1)
    # Only our task files are indexed (they include lm-eval's own by path); the index of every task is slower.
    return simple_evaluate(model="local-completions", model_args=args, tasks=list(tasks), limit=LMEVAL_ITEMS,
                           task_manager=TaskManager(include_path=str(local_tasks), include_defaults=False),
                           log_samples=True)


def logged_requests(out: dict, task: str) -> list[tuple[str, str, float]]:
    """(context, continuation, log-likelihood) of every request lm-eval made for `task`, item by item."""
    return [(context, continuation, float(response[0][0]))
            for sample in out["samples"][task]
            for (context, continuation), response in zip(sample["arguments"], sample["resps"])]


def lm_eval_tokens(tokenizer, context: str, continuation: str):
    """A request as lm-eval splits it into tokens for a tokenizer that starts text with BOS (the `lingosteer`
    model; local-completions once the server adds BOS): an empty context (XNLI) is BOS alone, before the
    continuation encoded without it; otherwise the context alone, the whole text, the continuation the rest."""
    from evaluation.scoring import Encoded

    if not context:
        return Encoded((tokenizer.bos_token_id, *tokenizer(continuation, add_special_tokens=False).input_ids), 1, 1)
    return Encoded(tuple(tokenizer(context + continuation).input_ids), len(tokenizer(context).input_ids), 1)


def bench_scores(hf_model, tokenizer, out: dict, task: str, condition, interventions: dict):
    """(lm-eval's log-likelihoods, bench's reference scores, bench's accuracy) of `task`'s requests."""
    import numpy as np

    from evaluation.scoring import score_with_hf

    logged = logged_requests(out, task)
    requests = [(lm_eval_tokens(tokenizer, context, continuation), condition) for context, continuation, _ in logged]
    ours, _ = score_with_hf(hf_model, requests, interventions, tokenizer.pad_token_id, progress=False)
    per_item = ours.reshape(len(out["samples"][task]), -1)
    gold = [int(sample["target"]) for sample in out["samples"][task]]
    return np.array([ll for _, _, ll in logged]), ours, float(np.mean(per_item.argmax(axis=1) == gold))


def test_lm_eval_local_completions_on_its_own_tasks_scores_plain_as_bench(
        server, model_name, model_dir, local_tasks, tokenizer, hf_model):
    """The plain model name: every option's log-likelihood and the accuracy are bench's on the same items
    (lm-eval's token-id prompts get their BOS from the server, and its echo leaves that BOS out)."""
    import numpy as np

    from evaluation.scoring import PLAIN

    out = local_completions(server, model_name, model_dir, local_tasks, LMEVAL_TASKS)
    for task in LMEVAL_TASKS:
        theirs, ours, accuracy = bench_scores(hf_model, tokenizer, out, task, PLAIN, {})
        np.testing.assert_allclose(theirs, ours, atol=HF_TOLERANCE, err_msg=task)
        assert out["results"][task]["acc,none"] == pytest.approx(accuracy), task


@pytest.fixture(scope="module")
def swahili_on_every_token(server, root, model_dir):
    """swh_Latn swapped, for the tests that ask for it, for a version whose serving defaults steer every token
    (EVERY_TOKEN); the version serving before comes back after the module's last test."""
    from alignment.artifact import ServingDefaults, set_serving_defaults
    from plugin_support import planted_evidence

    path = write_planted_intervention(root / ".every-token" / "swh", model_dir, [0, 1], "swh_Latn", seed=1)
    set_serving_defaults(path, ServingDefaults(**EVERY_TOKEN), planted_evidence(summary="planted: every token"))
    before = loaded(server)["swh_Latn"]["path"]

    def load(relative: str) -> None:
        reply = httpx.post(server["base"] + "/admin/interventions", json={"path": relative}, timeout=120,
                           headers={"Authorization": f"Bearer {server['token']}"})
        assert reply.status_code == 200, reply.text

    load(".every-token/swh")
    yield path
    load(before)


def test_a_model_name_steering_every_token_scores_as_bench(
        server, model_name, model_dir, local_tasks, tokenizer, hf_model, swahili_on_every_token):
    """Positions "all" mean the same tokens on an echo request (every prompt token after BOS) as in bench
    (context and continuation after BOS): lm-eval's numbers through `BASE:swh_Latn` are bench's steered ones."""
    import numpy as np

    from alignment.artifact import load_intervention
    from evaluation.scoring import PLAIN, Condition, extra_args

    named = f"{model_name}:swh_Latn"
    steered = Condition("swh_Latn", EVERY_TOKEN["alpha"], EVERY_TOKEN["positions"])
    intervention = {"swh_Latn": load_intervention(swahili_on_every_token)}
    out = local_completions(server, named, model_dir, local_tasks, LMEVAL_TASKS)
    for task in LMEVAL_TASKS:
        theirs, ours, accuracy = bench_scores(hf_model, tokenizer, out, task, steered, intervention)
        np.testing.assert_allclose(theirs, ours, atol=HF_TOLERANCE, err_msg=task)
        assert out["results"][task]["acc,none"] == pytest.approx(accuracy), task
        _, plain, _ = bench_scores(hf_model, tokenizer, out, task, PLAIN, {})
        assert np.abs(theirs - plain).max() > 1e-2, task  # steering changed them
    # The same engine, told bench's own positions for each request as token ranges: the same numbers.
    context, continuation, ll = logged_requests(out, "xcopa_sw")[0]
    encoded = lm_eval_tokens(tokenizer, context, continuation)
    replies = [httpx.post(server["base"] + "/v1/completions", timeout=120, json={
        "model": model, "prompt": list(encoded.token_ids), "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, **extra}).json() for model, extra in (
            (named, {}), (model_name, {"vllm_xargs": extra_args(encoded, steered)}))]
    assert replies[0]["lingosteer"]["positions"] == "all" and replies[0]["lingosteer"]["alpha"] == 1.0
    for reply in replies:
        assert sum(reply["choices"][0]["logprobs"]["token_logprobs"][encoded.context_len:-1]) == pytest.approx(
            ll, abs=1e-5)


def test_a_model_name_steering_the_last_token_refuses_echoed_logprobs(
        server, model_name, model_dir, local_tasks, tokenizer):
    """ita_Latn serves positions "last". bench steers the context's last token; an echo request does not say
    where its context ends, and its last token is the continuation's, whose steering changes no echoed
    log-probability: a 400 naming the ways out, and lm-eval stops instead of reporting a plain number."""
    import requests

    url = server["base"] + "/v1/completions"
    prompt = tokenizer(ITALIAN[0]).input_ids
    echo = {"model": f"{model_name}:ita_Latn", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1}
    reply = httpx.post(url, json=echo, timeout=120)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "echo"
    assert all(part in error["message"] for part in ("'last'", "`lingosteer bench`", "positions='all'",
                                                     "`lingosteer lm-eval`"))
    generation = {key: value for key, value in echo.items() if key != "echo"}
    assert httpx.post(url, json={**generation, "prompt_logprobs": 0}, timeout=120).status_code == 400
    # Generation, every token, or ranges the client computed from its own split: served.
    for body in (generation, {**echo, "vllm_xargs": {"positions": "all"}},
                 {**echo, "vllm_xargs": {"positions": [[len(prompt) - 3, len(prompt) - 2]]}}):
        assert httpx.post(url, json=body, timeout=120).status_code == 200, body
    with pytest.raises(requests.HTTPError, match="400"):
        local_completions(server, f"{model_name}:ita_Latn", model_dir, local_tasks, ["xcopa_it"])


def test_echoed_prompt_logprobs_under_context_positions_are_refused_before_submission(tokenizer, tmp_path):
    """The routing rule alone (no engine): which steered completions may ask for prompt log-probabilities."""
    from intervene_server.detection import LanguageDetector
    from intervene_server.prompt_tokens import PromptTokenizer
    from intervene_server.registry import InterventionRegistry
    from intervene_server.routing import LanguageRouter, RoutingError
    from intervene_server.schemas import InterventionInfo

    registry = InterventionRegistry(engine_client=None, root=tmp_path)
    for language, positions in (("swh_Latn", "last"), ("ita_Latn", "prompt"), ("fra_Latn", "all")):
        registry.loaded[language] = InterventionInfo(
            language=language, target="eng_Latn", version=f"v-{language}", path=language, layers=[0, 1],
            memory_bytes=0, serving={"alpha": 1.0, "layers": [0, 1], "positions": positions})
    router = LanguageRouter(registry, LanguageDetector(0.5), PromptTokenizer(tokenizer, None), served_models=("tiny",))

    def route(model: str, **body):
        return router.route({"model": model, "prompt": [5, 6, 7], **body}, "completion")

    for model in ("tiny:swh_Latn", "tiny:ita_Latn"):
        for body in ({"echo": True, "logprobs": 0}, {"prompt_logprobs": 0},
                     {"echo": True, "logprobs": 1, "vllm_xargs": {"positions": "last"}}):
            with pytest.raises(RoutingError, match="cannot be those of `lingosteer bench`") as refused:
                route(model, **body)
            assert refused.value.param == "echo" and refused.value.status == 400
        assert route(model, echo=True).applied  # echoes text, no log-probabilities
        assert route(model, logprobs=1).applied  # generated tokens' log-probabilities only
        assert route(model, echo=True, logprobs=1, vllm_xargs={"positions": "all"}).positions == "all"
        assert route(model, echo=True, logprobs=1, vllm_xargs={"positions": [[1, 3]]}).positions == [[1, 3]]
    assert route("tiny:fra_Latn", echo=True, logprobs=1).positions == "all"
    assert not route("tiny", echo=True, logprobs=1).applied  # plain
    # alpha 0 changes nothing: bench scores it plain too
    assert route("tiny:swh_Latn", echo=True, logprobs=1, vllm_xargs={"alpha": 0.0}).alpha == 0.0
