"""The XCOPA / XNLI benchmark on a tiny random Llama with planted interventions.

One vLLM engine (fp32, eager) for the module. Items are synthetic: SIB-200
sentences arranged as XCOPA / XNLI items, so scores are real model outputs.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.calibration import choose_alpha, contiguous_folds, parse_grid
from evaluation.report import markdown, read_report, write_report
from evaluation.runner import BenchmarkConfig, Scorer, Timing, _score_all, run_benchmark
from evaluation.scoring import PLAIN, Condition, Encoded, encode_examples, score_with_hf, score_with_vllm, steer_ranges
from evaluation.stats import mcnemar_exact
from evaluation.tasks import (
    TASKS,
    XCOPA,
    XNLI,
    Example,
    build_examples,
    find_files,
    get_task,
    infer_task,
    load_items,
    load_prompts,
)
from lingosteer.backend import scoring_engine_kwargs, shutdown_engine
from lingosteer.data import load_sib200
from lingosteer.stats import bootstrap_delta_ci, bootstrap_mean_ci
from plugin_support import planted_evidence, write_planted_intervention

ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
GRID = (-2.0, -1.0, 0.0, 1.0, 2.0)
N_ITEMS = 12


# ---- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def interventions(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("interventions")
    # Strong planted maps so that alpha visibly changes the options' scores.
    write_planted_intervention(root / "swh", model_dir, [0, 1], "swh_Latn", seed=1, strength=3.0)
    write_planted_intervention(root / "ita", model_dir, [0, 1], "ita_Latn", seed=2, strength=3.0, default_alpha=0.5)
    return root


def _sentences(lang, data_dir, n):
    return [row.text for row in load_sib200(lang, ("dev",), data_dir)[:n]]


def write_xcopa(path, sentences, flip=False):
    """Items premise = s[i], choices s[i+1], s[i+2]; `flip` swaps every label."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(sentences) - 2):
            label = (i % 2) ^ int(flip)
            f.write(json.dumps({"premise": sentences[i], "choice1": sentences[i + 1], "choice2": sentences[i + 2],
                                "question": ("cause", "effect")[i % 2], "label": label, "idx": i},
                               ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def xcopa_dir(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("xcopa")
    for code, flores in (("sw", "swh_Latn"), ("it", "ita_Latn"), ("en", "eng_Latn")):
        sentences = _sentences(flores, data_dir, N_ITEMS + 2)
        write_xcopa(root / f"val.{code}.jsonl", sentences)
        write_xcopa(root / f"flipped.{code}.jsonl", sentences, flip=True)
    return root


@pytest.fixture(scope="module")
def llm(model_dir, interventions):
    from vllm import LLM

    engine = LLM(**scoring_engine_kwargs(model_dir, **ENGINE))
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def config(model_dir, interventions, eval_paths, **kwargs):
    return BenchmarkConfig(task=kwargs.pop("task", XCOPA), model=model_dir, eval_paths=eval_paths,
                           interventions=interventions, alpha_grid=GRID, bootstrap=500, progress=False, **kwargs)


@pytest.fixture(scope="module")
def calibrated(llm, model_dir, interventions, xcopa_dir):
    """Calibrated on val.sw/it, evaluated on the same items (fine for mechanics) plus English."""
    cfg = config(model_dir, interventions, [xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl",
                                            xcopa_dir / "val.en.jsonl"],
                 calibrate_paths=[xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl"], steer="prompt")
    return run_benchmark(cfg, llm=llm)


# ---- prompts and tokens ---------------------------------------------------------------


def test_xcopa_prompt_follows_lm_eval(xcopa_dir):
    prompts = load_prompts(XCOPA)
    item = SimpleNamespace(premise="Mtu alivunja kioo.", choice1="Alikuwa na hasira.", choice2="Kioo kilikuwa safi.",
                           question="cause", label=0, idx=0)
    (example,) = build_examples(XCOPA, "sw", [item], prompts)
    assert example.context == "Mtu alivunja kioo kwa sababu"
    assert example.options == (" alikuwa na hasira.", " kioo kilikuwa safi.")
    with pytest.raises(ValueError, match="no prompt words for language 'xx'"):
        build_examples(XCOPA, "xx", [item], prompts)


def test_xnli_prompt_follows_lm_eval():
    item = SimpleNamespace(premise="Il pleut", hypothesis="Il fait beau", label=2)
    (example,) = build_examples(XNLI, "fr", [item], load_prompts(XNLI))
    assert example.context == "Il pleut, correct?"
    assert example.options == (" Oui, Il fait beau", " Aussi, Il fait beau", " Non, Il fait beau")


def test_encoding_splits_context_and_option(tokenizer):
    examples = build_examples(XCOPA, "en", [SimpleNamespace(
        premise="The man broke the glass.", choice1="He was angry.", choice2="It was clean.",
        question="effect", label=0, idx=0)], load_prompts(XCOPA))
    (options,) = encode_examples(tokenizer, examples)
    context_ids = tokenizer(examples[0].context)["input_ids"]
    for enc in options:
        assert list(enc.token_ids[: enc.context_len]) == context_ids
        assert enc.context_len < len(enc.token_ids)
        assert enc.token_ids[0] == tokenizer.bos_token_id and enc.num_special == 1
    enc = options[0]
    assert steer_ranges(enc, "last") == [[enc.context_len - 1, enc.context_len]]
    assert steer_ranges(enc, "prompt") == [[1, enc.context_len]]
    assert steer_ranges(enc, "all") == [[1, len(enc.token_ids)]]


def test_files_named_by_language(xcopa_dir, tmp_path):
    found = find_files(XCOPA, [xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl"])
    assert sorted(found) == ["it", "sw"]
    with pytest.raises(ValueError, match="two files for language 'en'"):
        find_files(XCOPA, [xcopa_dir])  # val.sw and flipped.sw
    (tmp_path / "sw.jsonl").write_text("")
    with pytest.raises(ValueError, match="cannot tell the language"):
        find_files(XCOPA, [tmp_path / "sw.jsonl"])


def test_tasks_are_values_looked_up_by_name():
    assert get_task("xnli") is XNLI and XCOPA.chance == 0.5
    with pytest.raises(ValueError, match="unknown task 'copa'; known: xcopa, xnli"):
        get_task("copa")
    for task in TASKS.values():
        assert len(load_prompts(task)["mc"]["letters"]) == len(task.incline.answers) == task.choices
    assert infer_task([Path("data/xnli/dev.sw.tsv")]) is XNLI
    with pytest.raises(ValueError, match="pass --task xcopa or --task xnli"):
        infer_task([Path("data/xcopa/val.sw.jsonl"), Path("data/xnli/dev.sw.tsv")])


# ---- scoring against a direct computation ----------------------------------------------


def _direct_loglik(hf_model, enc):
    """log p(option | context) straight from the HF model's logits, no project code."""
    ids = torch.tensor([enc.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[j - 1, enc.token_ids[j]].item() for j in range(enc.context_len, len(enc.token_ids)))


def test_vllm_scores_equal_direct_and_hf_reference(llm, tokenizer, hf_model, interventions, xcopa_dir):
    from alignment.artifact import load_intervention
    from lingosteer.data import load_xcopa

    llm.collective_rpc("lingosteer_load", args=(str(interventions / "swh"),))
    examples = build_examples(XCOPA, "sw", load_xcopa(xcopa_dir / "val.sw.jsonl")[:4], load_prompts(XCOPA))
    encoded = [enc for options in encode_examples(tokenizer, examples) for enc in options]
    steered = Condition("swh_Latn", 1.5, "prompt")
    requests = [(enc, PLAIN) for enc in encoded] + [(enc, steered) for enc in encoded]
    vllm_scores = score_with_vllm(llm, requests, progress=False).scores
    hf_scores, _ = score_with_hf(hf_model, requests, {"swh_Latn": load_intervention(interventions / "swh")},
                                 tokenizer.pad_token_id, batch_size=2, progress=False)
    direct = np.array([_direct_loglik(hf_model, enc) for enc in encoded])
    np.testing.assert_allclose(vllm_scores[: len(encoded)], direct, atol=2e-3)
    np.testing.assert_allclose(hf_scores[: len(encoded)], direct, atol=1e-4)
    np.testing.assert_allclose(vllm_scores[len(encoded):], hf_scores[len(encoded):], atol=2e-3)
    # steering really changed the scores
    assert np.abs(vllm_scores[len(encoded):] - vllm_scores[: len(encoded)]).max() > 1e-2


def test_predictions_pick_the_higher_loglikelihood(calibrated):
    _, items = calibrated
    for record in items:
        for kind in ("baseline", "intervened"):
            scores = record[f"{kind}_scores"]
            assert record[f"{kind}_correct"] == (int(np.argmax(scores)) == record["label"])


# ---- calibration is blind to the evaluation split ---------------------------------------


def test_calibration_never_reads_the_evaluation_split(llm, model_dir, interventions, xcopa_dir, calibrated):
    report, _ = calibrated
    cfg = config(model_dir, interventions, [xcopa_dir / "flipped.sw.jsonl", xcopa_dir / "flipped.it.jsonl"],
                 calibrate_paths=[xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl"], steer="prompt")
    flipped, _ = run_benchmark(cfg, llm=llm)
    changed_somewhere = False
    for code in ("sw", "it"):
        accuracy = report["languages"][code]["calibration"]["grid_accuracy"]
        # What the rule would pick from the flipped labels (2 options: flipped accuracy = 1 - accuracy).
        would_pick = min(range(len(GRID)), key=lambda i: (-(1 - accuracy[i]), abs(GRID[i]), GRID[i]))
        changed_somewhere |= GRID[would_pick] != report["languages"][code]["alpha"]
        assert flipped["languages"][code]["alpha"] == report["languages"][code]["alpha"]
        assert flipped["languages"][code]["calibration"] == report["languages"][code]["calibration"]
        # the evaluation did use the flipped labels
        assert flipped["languages"][code]["baseline"] == pytest.approx(1 - report["languages"][code]["baseline"])
    assert changed_somewhere, "the flipped labels would not change any choice: the test proves nothing"


def test_choose_alpha_prefers_accuracy_then_weaker_alpha():
    grid = (-1.0, 0.0, 0.5, 1.0)
    correct = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    assert choose_alpha(grid, correct) == (1.0, [0.5, 0.25, 0.5, 0.75])
    correct[3] = [1, 0, 0, 0]
    assert choose_alpha(grid, correct)[0] == 0.5  # tie between -1 and 0.5: smaller |alpha|
    with pytest.raises(ValueError):
        parse_grid("1,x")


def _prefilled_scorer(tmp_path, lang, tables_per_set):
    """A Scorer whose every entry is already scored, so it never calls the engine."""
    from alignment.artifact import save_intervention
    from alignment.estimator import LinearAligner

    map_sets = []
    states = np.zeros((1, 4, 2))
    for m, tables in enumerate(tables_per_set):
        # An artifact fitted on no benchmark items; its maps are never applied.
        artifact = save_intervention(tmp_path / f"maps{m}", LinearAligner(solver="meanshift").fit(states, states + 1),
                                     fingerprint={"hidden_size": 2}, source=lang.flores, target="eng_Latn",
                                     layers=[0], pooling="mean", fit_data={})
        map_sets.append({lang.flores: artifact})
    scorer = Scorer(llm=None, map_sets=map_sets, timing=Timing(), progress=False)
    for m, tables in enumerate(tables_per_set):
        for condition, table in tables.items():
            scorer.scores(lang, condition, m)[:] = table
    return scorer


def _fake_language(n):
    return SimpleNamespace(code="sw", flores="swh_Latn", labels=np.zeros(n, dtype=int), n=n, english=False,
                           path=Path("val.sw.jsonl"), examples=[SimpleNamespace(options=("a", "b"))] * n,
                           table_prefix=f"val.sw.jsonl[0:{n}]", file_indices=np.arange(n))


def test_torch_compile_only_where_its_start_up_pays_back():
    from evaluation.runner import COMPILE_PAYS_BACK_TOKENS, compile_pays_back

    def sets(items, tokens_per_option):
        encoded = [[Encoded(tuple(range(tokens_per_option)), 2, 1)] * 2 for _ in range(items)]
        return {"sw": SimpleNamespace(encoded=encoded)}

    cfg = SimpleNamespace(plain_only=False, alpha_grid=GRID, cross_fit=2)
    per_language = 2 * 22 * (2 + len(GRID))  # tokens of one item, cross-fitted over the grid
    small = sets(COMPILE_PAYS_BACK_TOKENS // per_language - 1, 22)
    large = sets(COMPILE_PAYS_BACK_TOKENS // per_language + 1, 22)
    assert not compile_pays_back(cfg, small, {}) and compile_pays_back(cfg, large, {})
    plain = SimpleNamespace(plain_only=True, alpha_grid=GRID, cross_fit=None)
    assert not compile_pays_back(plain, large, {})  # two conditions' worth of tokens, not seven


def test_cross_fit_chooses_each_folds_alpha_on_the_other_folds(tmp_path):
    grid = (-1.0, 0.0, 1.0)
    lang = _fake_language(8)
    # option 0 is right everywhere; alpha -1 is good on items 0-3 only, alpha +1 on items 4-7 only
    good, bad = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    tables = {PLAIN: np.tile(bad, (8, 1)), Condition("swh_Latn", -1.0, "last"): np.array([good] * 4 + [bad] * 4),
              Condition("swh_Latn", 1.0, "last"): np.array([bad] * 4 + [good] * 4)}
    cfg = SimpleNamespace(alpha_grid=grid, steer="last", cross_fit=2, plain_only=False)
    outcome = _score_all(cfg, _prefilled_scorer(tmp_path, lang, [tables]), {"sw": lang}, {})["sw"]
    # fold 0 (items 0-3) is evaluated with the alpha its complement prefers (+1): all wrong there
    assert outcome.alpha == [1.0, -1.0]
    assert not outcome.intervened.any()
    assert list(outcome.fold_of_item) == [0] * 4 + [1] * 4
    assert [len(f) for f in contiguous_folds(7, 2)] == [4, 3]


def test_cross_fit_uses_each_folds_own_intervention_set(tmp_path):
    grid = (0.0, 1.0)
    lang = _fake_language(8)
    good, bad = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    plain = np.tile(bad, (8, 1))
    steered = Condition("swh_Latn", 1.0, "last")
    # set 0 helps everywhere, set 1 nowhere: fold 0 must be calibrated and evaluated with set 0 only
    sets = [{PLAIN: plain, steered: np.tile(good, (8, 1))}, {PLAIN: plain, steered: np.tile(bad, (8, 1))}]
    cfg = SimpleNamespace(alpha_grid=grid, steer="last", cross_fit=2, plain_only=False)
    outcome = _score_all(cfg, _prefilled_scorer(tmp_path, lang, sets), {"sw": lang}, {})["sw"]
    assert outcome.alpha == [1.0, 0.0]
    assert list(outcome.intervened) == [True] * 4 + [False] * 4
    assert list(outcome.maps_of_item) == [0] * 4 + [1] * 4


# ---- report ---------------------------------------------------------------------------


def test_report_contract_and_round_trip(calibrated, tmp_path):
    report, items = calibrated
    assert report["task"] == "xcopa"
    for code in ("sw", "it"):
        row = report["languages"][code]
        assert row["n"] == N_ITEMS and row["alpha"] in GRID
        assert 0 <= row["baseline"] <= 1 and 0 <= row["intervened"] <= 1
        lang_items = [r for r in items if r["language"] == code]
        assert row["baseline"] == pytest.approx(np.mean([r["baseline_correct"] for r in lang_items]))
        assert row["transfer"]["baseline"] == pytest.approx(row["baseline"] / report["english"]["accuracy"])
        low, high = row["delta_ci95"]
        assert low <= row["delta"] <= high
        low, high = row["baseline_ci95"]
        assert low <= row["baseline"] <= high
    assert "en" not in report["languages"] and report["english"]["n"] == N_ITEMS
    assert report["mean"]["baseline"] == pytest.approx(
        np.mean([report["languages"][c]["baseline"] for c in ("sw", "it")]))
    assert sorted(report["groups"]["latin-script"]["languages"]) == ["it", "sw"]
    paths = write_report(report, items, tmp_path / "out")
    assert read_report(tmp_path / "out") == json.loads(json.dumps(report))
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths["items"].read_text().splitlines()) == len(items)
    assert "| sw | 12 |" in markdown(report)


def test_without_interventions_every_language_is_a_plain_baseline(llm, model_dir, xcopa_dir, calibrated):
    files = [xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl", xcopa_dir / "val.en.jsonl"]
    report, items = run_benchmark(config(model_dir, None, files), llm=llm)
    steered_report, _ = calibrated
    for code in ("sw", "it"):
        row = report["languages"][code]
        assert row["alpha"] is None and row["intervention"] is None
        assert row["intervened"] == row["baseline"] == steered_report["languages"][code]["baseline"]
    assert report["alpha_selection"].startswith("none")
    assert report["engine"]["dtype"] == "float32" and report["engine"]["cpu"]
    assert report["engine"]["enforce_eager"] is True  # the fixture's engine
    assert "float32" in markdown(report)
    with pytest.raises(ValueError, match="give --interventions"):
        run_benchmark(config(model_dir, None, files, cross_fit=2), llm=llm)


def test_manifest_alpha_without_calibration_and_xnli(llm, model_dir, interventions, tmp_path, data_dir):
    sw, en = _sentences("swh_Latn", data_dir, 10), _sentences("eng_Latn", data_dir, 10)
    labels = ("entailment", "neutral", "contradiction")
    for code, sentences in (("sw", sw), ("en", en)):
        lines = [f"{sentences[i]}\t{sentences[i + 1]}\t{labels[i % 3]}" for i in range(9)]
        (tmp_path / f"dev.{code}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report, items = run_benchmark(config(model_dir, interventions, [tmp_path], task=XNLI), llm=llm)
    row = report["languages"]["sw"]
    assert row["alpha"] == 1.0 and row["n"] == 9  # the artifact's serving alpha
    assert all(len(r["baseline_scores"]) == 3 for r in items)
    assert report["english"]["n"] == 9


def test_reference_check_agrees_with_vllm(llm, model_dir, interventions, xcopa_dir):
    cfg = config(model_dir, interventions, [xcopa_dir / "val.sw.jsonl"], cross_fit=2, reference="hf",
                 reference_sample=4)
    report, _ = run_benchmark(cfg, llm=llm)
    ref = report["performance"]["reference"]
    assert ref["items"] == 4 and ref["sequences"] == ref["item_conditions"] * 2
    assert ref["max_abs_loglik_diff"] < 2e-3 and ref["prediction_agreement"] == 1.0
    assert ref["speed_ratio"] > 0 and isinstance(report["languages"]["sw"]["alpha"], list)


def test_shared_prefix_scoring_equals_the_plain_way(llm, tokenizer, interventions, data_dir):
    """Contexts of 70+ tokens (whole KV blocks to share), options with a common first word (so a
    block past the context could match) and one-token options (nothing left to read from the prompt):
    the fast way gives today's scores, and really shares."""
    llm.collective_rpc("lingosteer_load", args=(str(interventions / "swh"),))
    sentences = _sentences("swh_Latn", data_dir, 12)
    examples = [Example(" ".join(sentences[i:i + 3]), (" na " + sentences[i + 3], " na " + sentences[i + 4]), 0)
                for i in range(0, 8, 2)]
    examples.append(Example(" ".join(sentences[8:11]), (" na", " ya"), 1))  # one-token options: all sampled
    encoded = [enc for options in encode_examples(tokenizer, examples) for enc in options]
    assert min(enc.context_len for enc in encoded) > 64
    assert len(encoded[-1].token_ids) - encoded[-1].context_len == 1
    conditions = [PLAIN, *(Condition("swh_Latn", a, "last") for a in (-1.0, 1.0, 2.0)),
                  Condition("swh_Latn", 1.0, "prompt"), Condition("swh_Latn", 1.0, "all")]
    requests = [(enc, condition) for condition in conditions for enc in encoded]
    llm.reset_prefix_cache()
    plain_way = score_with_vllm(llm, requests, progress=False, shared_prefix=False)
    llm.reset_prefix_cache()
    fast = score_with_vllm(llm, requests, progress=False)
    assert np.abs(fast.scores - plain_way.scores).max() <= 1e-4
    assert (fast.greedy == plain_way.greedy).all()
    width = len(encoded)
    for k in range(len(conditions)):
        chosen = lambda scores: scores[k * width:(k + 1) * width].reshape(-1, 2).argmax(axis=1)  # noqa: E731
        assert (chosen(fast.scores) == chosen(plain_way.scores)).all()
    assert plain_way.cached_tokens == 0 and fast.cached_tokens >= 32 * len(encoded) * 3
    # "prompt" and "all" steer from token 1: they share blocks among themselves, never with plain runs.
    everywhere = [(enc, condition) for condition in conditions[-2:] for enc in encoded]
    llm.reset_prefix_cache()
    alone = score_with_vllm(llm, everywhere, progress=False).cached_tokens
    llm.reset_prefix_cache()
    score_with_vllm(llm, [(enc, PLAIN) for enc in encoded], progress=False)
    assert score_with_vllm(llm, everywhere, progress=False).cached_tokens == alone
    # "last" steers the last context token: the blocks before it are the plain run's.
    last = [(enc, conditions[1]) for enc in encoded]
    assert score_with_vllm(llm, last, progress=False).cached_tokens >= 64 * len(encoded)


def test_greedy_flag_is_true_exactly_for_the_greedy_continuation(llm, tokenizer):
    from vllm import SamplingParams

    context = tokenizer("Habari ya asubuhi, rafiki yangu")["input_ids"]
    [output] = llm.generate([{"prompt_token_ids": context}], SamplingParams(max_tokens=3, temperature=0.0,
                                                                          ignore_eos=True), use_tqdm=False)
    greedy = list(output.outputs[0].token_ids)
    other = greedy[:2] + [(greedy[2] + 1) % 100 + 5]
    requests = [(Encoded(tuple(context + option), len(context), 1), PLAIN) for option in (greedy, other)]
    assert list(score_with_vllm(llm, requests, progress=False).greedy) == [True, False]


def test_per_fold_interventions_score_each_fold_with_its_own_maps(llm, model_dir, tokenizer, interventions,
                                                                  xcopa_dir, tmp_path):
    other = write_planted_intervention(tmp_path / "other" / "swh", model_dir, [0, 1], "swh_Latn", seed=3,
                                       strength=3.0)
    cfg = config(model_dir, [interventions, other.parent], [xcopa_dir / "val.sw.jsonl"], cross_fit=2)
    report, items = run_benchmark(cfg, llm=llm)
    assert report["languages"]["sw"]["intervention"] == [str(interventions / "swh"), str(other)]
    lang = find_files(XCOPA, [xcopa_dir / "val.sw.jsonl"])
    examples = build_examples(XCOPA, "sw", load_items(XCOPA, lang["sw"]), load_prompts(XCOPA), "lm-eval")
    encoded = encode_examples(tokenizer, examples)
    for fold, artifact in enumerate([interventions / "swh", other]):
        rows = [r for r in items if r["fold"] == fold]
        llm.collective_rpc("lingosteer_load", args=(str(artifact),))
        requests = [(enc, Condition("swh_Latn", rows[0]["alpha"], "last")) for r in rows for enc in encoded[r["index"]]]
        direct = score_with_vllm(llm, requests, progress=False).scores
        assert np.allclose(direct, [x for r in rows for x in r["intervened_scores"]], atol=1e-4)
    llm.collective_rpc("lingosteer_load", args=(str(interventions / "swh"),))


def test_evaluating_items_an_intervention_was_fitted_on_is_refused(llm, model_dir, xcopa_dir, tmp_path):
    half = N_ITEMS // 2
    fitted_on = lambda a, b: {"task_items": {"file": "val.sw.jsonl", "ranges": [[a, b]]}}  # noqa: E731
    write_planted_intervention(tmp_path / "leaky" / "swh", model_dir, [0, 1], "swh_Latn", fit_data=fitted_on(0, 3))
    with pytest.raises(ValueError, match="val.sw.jsonl"):
        run_benchmark(config(model_dir, tmp_path / "leaky", [xcopa_dir / "val.sw.jsonl"], cross_fit=2), llm=llm)
    # items are checked by their index in the file: past the fitted ones, the same maps are fair
    report, _ = run_benchmark(config(model_dir, tmp_path / "leaky", [xcopa_dir / "val.sw.jsonl"], cross_fit=2,
                                     skip_items=3), llm=llm)
    assert report["languages"]["sw"]["n"] == N_ITEMS - 3
    # one set per fold, each fitted on the other fold's items only: allowed
    write_planted_intervention(tmp_path / "fold0" / "swh", model_dir, [0, 1], "swh_Latn",
                               fit_data=fitted_on(half, N_ITEMS))
    write_planted_intervention(tmp_path / "fold1" / "swh", model_dir, [0, 1], "swh_Latn", fit_data=fitted_on(0, half))
    cfg = config(model_dir, [tmp_path / "fold0", tmp_path / "fold1"], [xcopa_dir / "val.sw.jsonl"], cross_fit=2)
    report, _ = run_benchmark(cfg, llm=llm)
    assert report["languages"]["sw"]["n"] == N_ITEMS
    with pytest.raises(ValueError, match="one per fold"):
        run_benchmark(config(model_dir, [tmp_path / "fold0", tmp_path / "fold1"], [xcopa_dir / "val.sw.jsonl"]),
                      llm=llm)


def test_serving_defaults_are_reported_only_on_items_they_were_not_calibrated_on(llm, model_dir, xcopa_dir,
                                                                                  tmp_path):
    """An artifact calibrated on the first 6 items of val.sw.jsonl: the bench refuses to report its
    defaults on them, and with --skip-items 6 scores items 6-11 exactly as a run over the whole file does."""
    from alignment.artifact import ServingDefaults, set_serving_defaults

    sw, half = xcopa_dir / "val.sw.jsonl", N_ITEMS // 2
    built = write_planted_intervention(tmp_path / "built" / "swh", model_dir, [0, 1], "swh_Latn", seed=1, strength=3.0)
    set_serving_defaults(built, ServingDefaults(alpha=1.0, layers=[0, 1], positions="last"),
                         planted_evidence(file=f"elsewhere/{sw.name}", items=half))
    for skip in (0, half - 1):
        with pytest.raises(ValueError, match=rf"items 0-{half - 1} of val.sw.jsonl.*--skip-items {half}"):
            run_benchmark(config(model_dir, tmp_path / "built", [sw], skip_items=skip), llm=llm)
    # The same maps uncalibrated (serving = alpha 1 on every layer, as set above): the whole file.
    write_planted_intervention(tmp_path / "uncalibrated" / "swh", model_dir, [0, 1], "swh_Latn", seed=1, strength=3.0)
    _, whole = run_benchmark(config(model_dir, tmp_path / "uncalibrated", [sw]), llm=llm)

    report, records = run_benchmark(config(model_dir, tmp_path / "built", [sw], skip_items=half), llm=llm)
    assert report["languages"]["sw"]["n"] == half and report["languages"]["sw"]["first_item"] == half
    assert f"each file's from item {half} on" in markdown(report)
    assert [r["index"] for r in records] == list(range(half, N_ITEMS))
    assert_same_items(records, [r for r in whole if r["index"] >= half])

    # A store that holds the first 6 items' scores never stands in for items 6-11 (same file, same count).
    store = tmp_path / "scores"
    run_benchmark(config(model_dir, tmp_path / "uncalibrated", [sw], max_items=half, scores_dir=store), llm=llm)
    _, later = run_benchmark(config(model_dir, tmp_path / "uncalibrated", [sw], skip_items=half, scores_dir=store),
                             llm=llm)
    assert_same_items(later, [r for r in whole if r["index"] >= half])
    with pytest.raises(ValueError, match="no items left after skipping the first 12"):
        run_benchmark(config(model_dir, tmp_path / "uncalibrated", [sw], skip_items=N_ITEMS), llm=llm)


def assert_same_items(records, expected):
    """Same items, labels and choices; scores equal up to batch-dependent float rounding."""
    scores = ("baseline_scores", "intervened_scores")
    assert [{k: v for k, v in r.items() if k not in scores} for r in records] == [
        {k: v for k, v in r.items() if k not in scores} for r in expected]
    for key in scores:
        assert np.allclose([r[key] for r in records], [r[key] for r in expected], atol=1e-4)


# ---- bad input ------------------------------------------------------------------------


def test_malformed_file_fails_naming_file_and_line(model_dir, interventions, xcopa_dir, tmp_path, capsys):
    from lingosteer.entrypoints.main import main

    lines = (xcopa_dir / "val.sw.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = '{"premise": "no choices"'
    bad = tmp_path / "test.sw.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["bench", "xcopa", "--model", str(model_dir), "--interventions", str(interventions),
                 "--eval", str(bad), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{bad}:3" in capsys.readouterr().err


# ---- statistics -----------------------------------------------------------------------


def test_mcnemar_exact_matches_binomial_by_hand():
    baseline = np.array([1] * 1 + [0] * 9 + [1] * 5, dtype=bool)
    intervened = np.array([0] * 1 + [1] * 9 + [1] * 5, dtype=bool)
    result = mcnemar_exact(baseline, intervened)
    assert (result["baseline_only"], result["intervened_only"]) == (1, 9)
    assert result["p"] == pytest.approx(2 * (1 + 10) / 2**10)  # two-sided, Bin(10, 1/2), k <= 1
    assert mcnemar_exact(baseline, baseline)["p"] == 1.0


def test_bootstrap_ci_brackets_the_delta_and_collapses_without_discordance():
    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.5
    inter = base.copy()
    inter[:30] = True
    delta = inter.mean() - base.mean()
    low, high = bootstrap_delta_ci([(base, inter)], resamples=2000, seed=0)
    assert low < delta < high and low > 0
    se = math.sqrt(np.var(inter.astype(float) - base) / 200)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_delta_ci([(base, base)], resamples=500) == (0.0, 0.0)


def test_bootstrap_mean_ci_brackets_the_accuracy_and_weighs_languages_equally():
    rng = np.random.default_rng(2)
    small, large = rng.random(100) < 0.8, rng.random(2000) < 0.4
    low, high = bootstrap_mean_ci([large], resamples=2000, seed=0)
    se = math.sqrt(large.mean() * (1 - large.mean()) / large.size)
    assert low < large.mean() < high and high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
    low, high = bootstrap_mean_ci([small, large], resamples=2000, seed=0)
    assert low < (small.mean() + large.mean()) / 2 < high  # not the pooled accuracy (~0.42)
    assert low > np.concatenate([small, large]).mean() + 0.1
    assert bootstrap_mean_ci([np.ones(50)], resamples=500) == (1.0, 1.0)
    # The delta CI is the mean CI of the paired differences.
    assert bootstrap_delta_ci([(large, small[:1] | large)], 500, 3) == bootstrap_mean_ci(
        [(small[:1] | large).astype(float) - large], 500, 3)


def test_shared_items_resample_an_item_with_all_of_its_rows():
    row = (np.random.default_rng(4).random(300) < 0.6).astype(float)
    one = bootstrap_mean_ci([row], 2000, 0)
    # Two identical rows: drawn together they are one row; drawn independently their noise averages out.
    shared = bootstrap_mean_ci([row, row], 2000, 0, shared_items=True)
    independent = bootstrap_mean_ci([row, row], 2000, 0)
    assert shared == pytest.approx(one)
    assert independent[1] - independent[0] < 0.8 * (shared[1] - shared[0])


# ---- calibrated serving defaults (align build) ------------------------------------------


def test_search_space_covers_alpha_signs_layer_bands_and_positions():
    from evaluation.calibration import search_space

    space = search_space(list(range(18)))
    assert {c.layers for c in space} == {tuple(range(18)), tuple(range(6, 12)), (9,)}
    assert {c.alpha for c in space} == {-1.0, -0.5, 0.5, 1.0} and {c.positions for c in space} == {"last", "prompt"}
    assert len(space) == 24


def test_cross_validation_chooses_each_fold_on_the_others_and_scores_it_under_that_choice():
    from evaluation.calibration import cross_validate

    correct = {"a": np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool), "b": np.array([0, 1, 1, 0, 0, 1, 0], dtype=bool)}
    seen = []

    def choose(items):
        seen.append(items.tolist())
        return "a" if 0 in items else "b"

    held_out, chosen = cross_validate(correct, choose, folds=3)
    # contiguous folds of 7 items: [0, 1, 2], [3, 4], [5, 6]; each is chosen for on the other two
    assert seen == [[3, 4, 5, 6], [0, 1, 2, 5, 6], [0, 1, 2, 3, 4]]
    assert chosen == ["b", "a", "a"]
    assert held_out.tolist() == [False, True, True, True, False, False, True]  # b[0:3] + a[3:7]
    with pytest.raises(ValueError, match="same items"):
        cross_validate({"a": correct["a"], "b": correct["b"][:6]}, choose, folds=3)


def test_gate_adopts_only_a_gain_whose_ci_clears_zero():
    from alignment.artifact import ServingDefaults
    from evaluation.calibration import choose_serving

    rng = np.random.default_rng(0)
    n = 100
    plain = rng.random(n) < 0.5
    helpful = ServingDefaults(alpha=0.5, layers=(1, 2), positions="last")
    useless = ServingDefaults(alpha=-1.0, layers=(1,), positions="prompt")
    correct = {helpful: plain | (rng.random(n) < 0.5), useless: rng.random(n) < 0.5}
    choice = choose_serving(correct, plain)
    assert choice.adopted and choice.config == helpful and choice.delta_ci95[0] > 0
    assert choice.cross_validated_accuracy > choice.plain_accuracy and len(choice.fold_choices) == 5
    # Noise around plain: whatever wins on a fold, the cross-validated gain does not clear zero.
    noise = {ServingDefaults(alpha=a, layers=(1,), positions="last"): plain ^ (rng.random(n) < 0.1)
             for a in (-1.0, 1.0)}
    off = choose_serving(noise, plain)
    assert not off.adopted and off.config is None and off.delta_ci95[0] <= 0
    with pytest.raises(ValueError, match="at least 40"):
        choose_serving({helpful: correct[helpful][:39]}, plain[:39])


def test_calibration_adopts_a_planted_gain_and_stays_off_without_one(llm, model_dir, data_dir, tmp_path):
    """Labels written to be what the steered model picks (a gain) or what the plain model picks
    (no gain possible): the same artifact comes out adopted in one case and off in the other."""
    import shutil

    from alignment.artifact import load_intervention
    from evaluation.serving_defaults import calibrate_serving, load_calibration_items

    # Options of four words each: close enough in length that steering can flip the choice.
    sentences = [" ".join(text.split()[:4]) for text in _sentences("swh_Latn", data_dir, 62)]
    write_xcopa(tmp_path / "val.sw.jsonl", sentences)
    _, items = load_calibration_items(str(model_dir), [tmp_path / "val.sw.jsonl"], "swh_Latn", XCOPA)
    strong = write_planted_intervention(tmp_path / "strong", model_dir, [0, 1], "swh_Latn", seed=5, strength=30.0)
    scorer = Scorer(llm, [{"swh_Latn": strong}], Timing(), progress=False)
    steered = Condition("swh_Latn", 1.0, "prompt", (0, 1))  # = serving alpha 1, every layer, positions "prompt"
    scorer.score([(items, c, np.arange(items.n)) for c in (PLAIN, steered)], maps=0)
    picks = {name: scorer.scores(items, c, 0).argmax(axis=1) for name, c in (("plain", PLAIN), ("steered", steered))}
    assert (picks["plain"] != picks["steered"]).sum() >= 3  # the planted map changes some choices

    for name, expect_adopted in (("steered", True), ("plain", False)):
        (tmp_path / name).mkdir()
        write_xcopa(tmp_path / name / "val.sw.jsonl", sentences)
        lines = (tmp_path / name / "val.sw.jsonl").read_text().splitlines()
        records = [{**json.loads(line), "label": int(label)} for line, label in zip(lines, picks[name])]
        (tmp_path / name / "val.sw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        artifact = shutil.copytree(strong, tmp_path / name / "artifact")
        _, items = load_calibration_items(str(model_dir), [tmp_path / name], "swh_Latn", XCOPA)
        evidence = calibrate_serving(artifact, str(model_dir), XCOPA, items, progress=False, llm=llm)
        serving = load_intervention(artifact).serving
        assert evidence.adopted is expect_adopted and evidence.items == 60, evidence.summary
        assert (serving.alpha != 0) is expect_adopted
        assert ("gate not cleared" in evidence.summary) is not expect_adopted
        assert evidence.rule.startswith("Candidates:") and len(evidence.candidate_accuracy) == 16  # 2 layer sets


def test_a_configuration_chosen_across_languages_is_judged_on_a_language_it_was_not_chosen_on():
    from alignment.artifact import ServingDefaults
    from evaluation.calibration import choose_across_languages

    steady = ServingDefaults(alpha=0.5, layers=(1,), positions="last")
    spiky = ServingDefaults(alpha=-1.0, layers=(0, 1), positions="prompt")
    # the same gains as `steady`: the tie goes to the weaker
    stronger_twin = ServingDefaults(alpha=1.0, layers=(1,), positions="last")
    gains = {"x": {steady: 0.05, stronger_twin: 0.05, spiky: 0.30},
             "y": {steady: 0.05, stronger_twin: 0.05, spiky: -0.02},
             "z": {steady: 0.05, stronger_twin: 0.05, spiky: -0.02}}
    chosen = choose_across_languages(gains)
    # x's own +0.30 does not choose for x; it does choose for y and z (mean +0.14 over x and the other).
    assert chosen == {"x": steady, "y": spiky, "z": spiky}
    with pytest.raises(ValueError, match="2 or more languages"):
        choose_across_languages({"x": gains["x"]})


def test_bench_pooled_choice_reads_the_calibration_evidence_of_built_artifacts(model_dir, tmp_path):
    import subprocess
    import sys

    from alignment.artifact import ServingDefaults, set_serving_defaults
    from evaluation.calibration import search_space
    from lingosteer import REPO_ROOT

    candidates = search_space([0, 1])
    for code, flores, plain in (("sw", "swh_Latn", 0.5), ("it", "ita_Latn", 0.6), ("tr", "tur_Latn", 0.4)):
        path = write_planted_intervention(tmp_path / "built" / code, model_dir, [0, 1], flores)
        accuracy = {c.describe(): plain + (0.1 if c == candidates[0] else -0.01 * i) for i, c in enumerate(candidates)}
        set_serving_defaults(path, ServingDefaults(alpha=0.0, layers=[0, 1], positions="last"),
                             planted_evidence(plain_accuracy=plain, candidate_accuracy=accuracy))
    done = subprocess.run([sys.executable, "bench/pooled_choice.py", str(tmp_path / "built"), "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [summary] = json.loads(done.stdout).values()
    assert {row["chosen_on_the_others"] for row in summary["languages"].values()} == {candidates[0].describe()}
    assert summary["mean_gain"] == pytest.approx(0.1) and summary["up"] == 3 and summary["down"] == 0
    assert summary["mean_gain_ci95"] == pytest.approx([0.1, 0.1])  # every language moved alike
    (tmp_path / "uncalibrated").mkdir()
    write_planted_intervention(tmp_path / "uncalibrated" / "sw", model_dir, [0, 1], "swh_Latn")
    done = subprocess.run([sys.executable, "bench/pooled_choice.py", str(tmp_path / "uncalibrated")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no calibration evidence" in done.stderr


def test_an_interrupted_benchmark_resumes_from_its_stored_scores(llm, model_dir, interventions, xcopa_dir, tmp_path):
    """Scores are written as they complete: a rerun scores only what is missing, with the same
    result; a store made with other interventions is set aside, not mixed in."""
    import shutil

    paths = [xcopa_dir / "val.sw.jsonl", xcopa_dir / "val.it.jsonl"]
    cfg = config(model_dir, interventions, paths, cross_fit=2, scores_dir=tmp_path / "scores")
    first, _ = run_benchmark(cfg, llm=llm)
    assert first["performance"]["vllm_sequences"] > 0
    again, _ = run_benchmark(cfg, llm=llm)  # everything stored: nothing to score
    assert again["performance"]["vllm_sequences"] == 0
    assert again["languages"] == first["languages"]
    # An interruption that lost Italian's plain scores: only those 12 items x 2 options come back.
    index = json.loads((tmp_path / "scores" / "index.json").read_text())
    [plain_it] = [name for name in index["tables"] if "val.it.jsonl" in name and "language=None" in name]
    table = np.load(tmp_path / "scores" / index["tables"][plain_it])
    table[:] = np.nan
    np.save(tmp_path / "scores" / index["tables"][plain_it], table)
    resumed, _ = run_benchmark(cfg, llm=llm)
    assert resumed["performance"]["vllm_sequences"] == 2 * N_ITEMS and resumed["languages"] == first["languages"]
    # Other interventions: the old store is moved aside and everything is scored afresh.
    other = tmp_path / "other"
    shutil.copytree(interventions, other)
    write_planted_intervention(other / "swh", model_dir, [0, 1], "swh_Latn", seed=9, strength=3.0)
    fresh, _ = run_benchmark(config(model_dir, other, paths, cross_fit=2, scores_dir=tmp_path / "scores"), llm=llm)
    assert fresh["performance"]["vllm_sequences"] == first["performance"]["vllm_sequences"]
    assert any(p.name.startswith("scores.stale-") for p in tmp_path.iterdir())
