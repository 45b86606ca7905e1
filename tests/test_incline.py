"""INCLINE as published: the non-compounding edit, its fast path against the plain two-pass reference,
the exact-match scoring, and `align fit --recipe incline`."""

import json

import numpy as np
import pytest
import torch

from alignment.artifact import load_intervention, save_intervention
from alignment.estimator import LinearAligner
from alignment.hf_steering import layer_hooks
from alignment.hidden_states import load_model_and_tokenizer
from evaluation import incline
from evaluation.tasks import XCOPA, XNLI
from lingosteer.entrypoints.main import main
from lingosteer.data import code_switched, load_xcopa, load_xnli
from lingosteer.fingerprint import model_fingerprint
from lingosteer.stats import bootstrap_delta_ci


@pytest.fixture(scope="module")
def gemma(tiny_model_dir):
    # Gemma 3: sliding-window and global layers, so the shared prefix cache is exercised on both kinds.
    model_dir = tiny_model_dir("gemma3")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return model_dir, model, tokenizer


@pytest.fixture(scope="module")
def items(data_dir):
    return load_xcopa(data_dir / "xcopa" / "val.sw.jsonl")[:4]


@pytest.fixture(scope="module")
def task_items(data_dir, items):
    return {XCOPA: items, XNLI: load_xnli(data_dir / "xnli" / "dev.sw.tsv")[:4]}


def _incline_artifact(path, model_dir, layers, scale=0.5, seed=0, source="swh_Latn"):
    """A planted INCLINE-form artifact: W_incline a random d x d matrix of norm ~scale, no bias."""
    dim = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(layers), 4 * dim, dim))
    W = scale * rng.standard_normal((len(layers), dim, dim)) / np.sqrt(dim)
    aligner = LinearAligner(solver="lstsq", bias=False, holdout_fraction=0).fit(X, np.einsum("lnd,lde->lne", X, W))
    save_intervention(path, aligner, fingerprint=model_fingerprint(model_dir), source=source, target="eng_Latn",
                      layers=layers, pooling="mean", fit_data={"planted": True}, form="incline")
    return load_intervention(path)


@pytest.mark.parametrize("task", [XCOPA, XNLI], ids=lambda task: task.name)
def test_fast_path_equals_their_two_pass_protocol(gemma, task_items, task, tmp_path):
    model_dir, model, tokenizer = gemma
    layers = list(range(model.config.num_hidden_layers))
    intervention = _incline_artifact(tmp_path / "a", model_dir, layers)
    grid = (-1.0, 0.0, 0.5, 1.0)
    for item in task_items[task]:
        fast = incline.answer_logits(model, tokenizer, intervention, item, grid, task)
        reference = incline.answer_logits_uncached(model, tokenizer, intervention, item, grid, task)
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
        # s = 0 writes the clean values back: the plain model's logits at the answer positions.
        full_ids, last, _ = incline._encode(tokenizer, item, task)
        plain = model(full_ids).logits[0, last:].float()
        torch.testing.assert_close(fast[1], plain, atol=1e-4, rtol=1e-4)
        # A non-zero strength changes them: the edit reaches the answer positions.
        assert (fast[3] - plain).abs().max() > 1e-2


def test_edits_do_not_compound_across_layers(gemma, items, tmp_path):
    """Every layer's output at the last prompt token is exactly clean + s (D h_clean), never a function
    of the earlier layers' edits."""
    model_dir, model, tokenizer = gemma
    layers = list(range(model.config.num_hidden_layers))
    intervention = _incline_artifact(tmp_path / "a", model_dir, layers)
    full_ids, last, _ = incline._encode(tokenizer, items[0])
    clean, seen = {}, {}
    with layer_hooks(model, layers, incline._capture(clean, last)):
        model(full_ids)
    s = 0.8
    targets = incline._targets(clean, incline._maps(intervention, layers), torch.tensor([s]))
    with layer_hooks(model, layers, incline._overwrite(targets, last)):
        # registered after the overwrite hooks, so they see the written values
        with layer_hooks(model, layers, incline._capture(seen, last)):
            model(full_ids)
    for layer in layers:
        D, b = intervention.delta(layer)
        torch.testing.assert_close(seen[layer], clean[layer] + s * (D @ clean[layer] + b), atol=1e-4, rtol=1e-4)


def test_exact_match_scoring_follows_their_normalisation():
    assert incline.normalise(" A.\n") == "a" and incline.normalise("B</s>") == "b"
    assert incline.normalise(" A is") != "a"
    assert len(incline.GRID) == 19 and -0.3 not in incline.GRID and -0.2 not in incline.GRID and 0.0 in incline.GRID


def test_summary_reports_the_leaky_best_and_the_cross_validated_choice():
    rng = np.random.default_rng(0)
    grid = (-1.0, 0.0, 1.0)
    correct = rng.random((3, 100)) < np.array([[0.5], [0.5], [0.5]])
    correct[2, :50] = True  # s = 1 wins only on the first half: chosen on other folds, it is scored on new items
    summary = incline.summarise(correct, grid)
    assert summary["plain"] == pytest.approx(correct[1].mean())
    assert summary["best_on_items"]["s"] == 1.0
    assert summary["best_on_items"]["accuracy"] == pytest.approx(correct[2].mean())
    assert summary["cross_validated"]["accuracy"] <= summary["best_on_items"]["accuracy"]
    assert len(summary["cross_validated"]["s_per_fold"]) == incline.FOLDS
    # the CIs use the resamples they are given (the bench's --bootstrap)
    few = incline.summarise(correct, grid, resamples=200)
    pairs = [(correct[1], np.array(few["correct_cross_validated"]))]
    assert few["cross_validated"]["delta_ci95"] == list(bootstrap_delta_ci(pairs, 200, 0))


def test_a_map_form_artifact_is_refused(gemma, items, tmp_path):
    from tests.plugin_support import write_planted_intervention

    model_dir, model, tokenizer = gemma
    intervention = load_intervention(write_planted_intervention(tmp_path / "m", model_dir, [0], "swh_Latn"))
    with pytest.raises(ValueError, match="form 'incline'"):
        incline.answer_logits(model, tokenizer, intervention, items[0], (0.0,))


def test_code_switching_rewrites_the_odd_pairs():
    pairs = [("s0", "t0"), ("s1", "t1"), ("s2", "t2"), ("s3", "t3")]
    assert code_switched(pairs) == [("s0", "t0"), ("s1 t1", "t1 t1"), ("s2", "t2"), ("s3 t3", "t3 t3")]
    assert code_switched(pairs, every=1) == [(f"s{i} t{i}", f"t{i} t{i}") for i in range(4)]  # alignment_recipes'


def test_fit_recipe_incline_is_their_fit(tiny_model_dir, data_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "incline"
    assert main(["align", "fit", "--model", str(model_dir), "--source", "sw", "--recipe", "incline",
                 "--max-pairs", "40", "--out", str(out)]) == 0
    manifest = load_intervention(out).manifest
    assert (manifest.solver, manifest.form, manifest.pooling) == ("lstsq", "incline", "mean")
    assert manifest.fit_data.recipe == "incline" and manifest.fit_data.code_switched is True
    assert manifest.fit_data.num_pairs == 40 and manifest.fit_data.sources[0]["spec"] == "sib200:train"
    code = main(["align", "fit", "--model", str(model_dir), "--source", "sw", "--recipe", "incline",
                 "--solver", "ridge", "--out", str(tmp_path / "x")])
    assert code == 2 and "drop --solver" in capsys.readouterr().err


@pytest.mark.parametrize("task, eval_file", [(XCOPA, "val.sw.jsonl"), (XNLI, "dev.sw.tsv")],
                         ids=["xcopa", "xnli"])
def test_bench_section_scores_every_language_and_renders_beside_ours(gemma, data_dir, tmp_path, monkeypatch,
                                                                     task, eval_file):
    from evaluation.report import _incline_markdown
    from evaluation.runner import BenchmarkConfig, load_language_sets, run_incline
    from evaluation.tasks import load_prompts

    resamples_used = []

    def recording_ci(pairs, resamples=10000, *args, **kwargs):
        resamples_used.append(resamples)
        return bootstrap_delta_ci(pairs, resamples, *args, **kwargs)

    monkeypatch.setattr(incline, "bootstrap_delta_ci", recording_ci)

    model_dir, model, tokenizer = gemma
    _incline_artifact(tmp_path / "incline" / "sw", model_dir, [0, 1])
    config = BenchmarkConfig(task=task, model=str(model_dir), eval_paths=[data_dir / task.name / eval_file],
                             incline=tmp_path / "incline", max_items=10, progress=False, bootstrap=200)
    eval_sets = load_language_sets(config, config.eval_paths, tokenizer, load_prompts(task))
    section = run_incline(config, model_dir, eval_sets)
    assert resamples_used and set(resamples_used) == {200}  # every CI (per language, mean) uses --bootstrap
    for metric in incline.METRICS:
        row = section["languages"]["sw"][metric]
        assert row["items"] == 10 and len(row["accuracy_per_s"]) == len(incline.GRID)
        assert not any(key.startswith("correct_") for key in row)
    ours = {"baseline": 0.5, "intervened": 0.5}
    text = "\n".join(_incline_markdown({"incline": section, "languages": {"sw": ours}, "mean": ours}))
    assert "INCLINE as published" in text and text.count("| sw |") == 2 and text.count("**mean (1)**") == 2


def test_bench_incline_without_an_artifact_for_a_language_is_refused(gemma, data_dir, tmp_path):
    from evaluation.runner import BenchmarkConfig, load_language_sets, run_incline
    from evaluation.tasks import load_prompts

    model_dir, _, tokenizer = gemma
    (tmp_path / "empty").mkdir()
    config = BenchmarkConfig(task=XCOPA, model=str(model_dir), eval_paths=[data_dir / "xcopa" / "val.sw.jsonl"],
                             incline=tmp_path / "empty", max_items=2, progress=False)
    eval_sets = load_language_sets(config, config.eval_paths, tokenizer, load_prompts(XCOPA))
    with pytest.raises(FileNotFoundError, match="no intervention for swh_Latn"):
        run_incline(config, model_dir, eval_sets)


@pytest.mark.parametrize("task", [XCOPA, XNLI], ids=lambda task: task.name)
def test_answer_likelihood_reads_the_answer_logits_at_the_last_prompt_token(gemma, task_items, task, tmp_path):
    model_dir, model, tokenizer = gemma
    intervention = _incline_artifact(tmp_path / "a", model_dir, [0, 1])
    items = task_items[task]
    correct = incline.score_items(model, tokenizer, intervention, items, grid=(0.0, 1.0), task=task)
    first = [tokenizer(f" {answer}", add_special_tokens=False).input_ids[0] for answer in task.incline.answers]
    for i, item in enumerate(items):
        full_ids, last, _ = incline._encode(tokenizer, item, task)
        logits = model(full_ids).logits[0]
        assert correct["answer_likelihood"][0, i] == (int(logits[last, first].argmax()) == item.label)
        # their exact match: the gold answer's tokens are the argmax at every answer position
        argmax = logits[last:].argmax(-1)
        expected = incline.normalise(tokenizer.decode(argmax, skip_special_tokens=True))
        assert correct["exact_match"][0, i] == (expected == task.incline.answers[item.label].lower())


def test_xnli_is_asked_as_their_loader_asks_it(data_dir):
    item = load_xnli(data_dir / "xnli" / "dev.sw.tsv")[0]
    assert incline.question(item, XNLI) == (f"Take the following as truth: {item.premise}\nThen the following "
                                            f'statement: "{item.hypothesis}" is "true", "false", or "inconclusive"?')
    # labels 0 entailment, 1 neutral, 2 contradiction -> their answer words
    assert XNLI.incline.answers == ("true", "inconclusive", "false")


def test_bench_incline_keeps_what_it_scored_and_a_rerun_scores_only_what_is_missing(gemma, data_dir, tmp_path,
                                                                                   monkeypatch):
    from evaluation.runner import BenchmarkConfig, load_language_sets, run_incline
    from evaluation.tasks import load_prompts

    model_dir, _, tokenizer = gemma
    for code, flores in (("sw", "swh_Latn"), ("tr", "tur_Latn")):
        _incline_artifact(tmp_path / "incline" / code, model_dir, [0, 1], source=flores)
    config = BenchmarkConfig(task=XCOPA, model=str(model_dir), incline=tmp_path / "incline", max_items=6,
                             eval_paths=[data_dir / "xcopa" / f"val.{code}.jsonl" for code in ("sw", "tr")],
                             progress=False, bootstrap=200, scores_dir=tmp_path / "scores")
    eval_sets = load_language_sets(config, config.eval_paths, tokenizer, load_prompts(XCOPA))
    score_items, scored = incline.score_items, []

    def interrupted_after_one_language(model, tokenizer, intervention, items, **kwargs):
        if scored:
            raise KeyboardInterrupt
        scored.append(intervention.source)
        return score_items(model, tokenizer, intervention, items, **kwargs)

    monkeypatch.setattr(incline, "score_items", interrupted_after_one_language)
    with pytest.raises(KeyboardInterrupt):
        run_incline(config, model_dir, eval_sets)
    first = scored[0]

    def counted(model, tokenizer, intervention, items, **kwargs):
        scored.append(intervention.source)
        return score_items(model, tokenizer, intervention, items, **kwargs)

    monkeypatch.setattr(incline, "score_items", counted)
    resumed = run_incline(config, model_dir, eval_sets)
    assert scored[1:] == [{"swh_Latn": "tur_Latn", "tur_Latn": "swh_Latn"}[first]]  # only the missing language
    assert run_incline(config, model_dir, eval_sets) == resumed and len(scored) == 2  # all stored: nothing scored
    monkeypatch.setattr(incline, "score_items", score_items)
    fresh = run_incline(BenchmarkConfig(**{**vars(config), "scores_dir": None}), model_dir, eval_sets)
    assert fresh == resumed  # stored scores give the report a fresh run gives

    # Items 6-11 of the same files (--skip-items 6) are other items: scored afresh, never read from the store.
    later = BenchmarkConfig(**{**vars(config), "skip_items": 6, "max_items": 6})
    later_sets = load_language_sets(later, later.eval_paths, tokenizer, load_prompts(XCOPA), later.skip_items)
    premises = []
    monkeypatch.setattr(incline, "score_items", lambda model, tokenizer, intervention, items, **kwargs: (
        premises.append([item.premise for item in items]) or score_items(model, tokenizer, intervention, items,
                                                                         **kwargs)))
    run_incline(later, model_dir, later_sets)
    assert premises == [[item.premise for item in load_xcopa(data_dir / "xcopa" / f"val.{code}.jsonl")[6:12]]
                        for code in ("sw", "tr")]
