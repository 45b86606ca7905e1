"""Evaluation and diagnosis metrics against plain numpy references; reports written to disk."""

import json

import numpy as np
import pytest

from alignment.artifact import load_intervention, save_intervention
from alignment.diagnose import diagnose_languages, write_diagnosis_report
from alignment.estimator import LinearAligner
from alignment.evaluate import (evaluate_intervention, mean_pair_cosine, retrieval_p1, retrieval_p1_raw_and_centred,
                                 write_compare_report, write_eval_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def numpy_p1(queries, keys):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ k.T, axis=1) == np.arange(len(q))))


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 16)).astype(np.float32)
    queries = keys + rng.normal(scale=1.2, size=keys.shape).astype(np.float32)  # some, not all, retrieved
    p1 = retrieval_p1(queries, keys)
    assert 0.0 < p1 < 1.0
    assert p1 == numpy_p1(queries, keys)
    cos = np.mean(np.sum(queries * keys, 1) / np.linalg.norm(queries, axis=1) / np.linalg.norm(keys, axis=1))
    assert mean_pair_cosine(queries, keys) == pytest.approx(cos, rel=1e-5)


@pytest.fixture
def planted_intervention(tmp_path):
    """Target = rotation of source + a shared offset; an artifact fitted on separate pairs."""
    rng = np.random.default_rng(1)
    d, layers = 24, [0, 2]
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]

    def pairs(n):
        X = rng.normal(size=(len(layers), n, d)).astype(np.float32)
        Y = np.einsum("ij,lnj->lni", rotation, X) + 5.0 + 0.3 * rng.normal(size=X.shape)
        return X, Y.astype(np.float32)

    aligner = LinearAligner(bias=True).fit(*pairs(400))
    fingerprint = {"architecture": "T", "hidden_size": d, "num_hidden_layers": 3, "config_sha256": "a",
                   "tokenizer_sha256": "b"}
    path = save_intervention(tmp_path / "art", aligner, fingerprint=fingerprint, source="swh_Latn", target="eng_Latn",
                             layers=layers, pooling="mean", fit_data={})
    return load_intervention(path), pairs(100)


def test_evaluation_shows_the_planted_alignment(planted_intervention, tmp_path):
    intervention, (X, Y) = planted_intervention
    report = evaluate_intervention(intervention, X, Y)
    assert report["source"] == "swh_Latn" and report["target"] == "eng_Latn" and report["num_pairs"] == 100
    for i, row in enumerate(report["layers"]):
        assert row["layer"] == intervention.layers[i]
        assert row["p1_before"] == numpy_p1(X[i], Y[i]) and row["p1_before"] < 0.2
        assert row["p1_after"] == numpy_p1(intervention.apply(X[i], row["layer"], 1.0), Y[i]) and row["p1_after"] > 0.95
        assert row["p1_tgt_to_src_after"] > 0.95 and row["cosine_after"] > row["cosine_before"] + 0.1
        assert row["p1_after_centred"] > 0.95 and row["cosine_after_centred"] > row["cosine_before_centred"]
    # alpha = 0 is no intervention at all
    unchanged = evaluate_intervention(intervention, X, Y, alpha=0.0)["layers"][0]
    assert unchanged["p1_after"] == unchanged["p1_before"]
    assert unchanged["cosine_after"] == pytest.approx(unchanged["cosine_before"], abs=1e-6)

    paths = write_eval_report(report, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == report
    assert "| 2 |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def test_centred_metrics_remove_a_shared_component():
    # Translations differ by small noise, but every state also carries a large shared
    # direction whose size varies by sentence: raw cosine retrieval finds the hubs,
    # centred retrieval finds the translations.
    from alignment.evaluate import layer_metrics

    rng = np.random.default_rng(3)
    n, d = 80, 32
    meaning = rng.normal(size=(n, d))
    shared = np.zeros(d)
    shared[0] = 1.0
    src = meaning + 0.5 * rng.normal(size=(n, d)) + 40 * rng.uniform(1, 2, size=(n, 1)) * shared + 30.0
    tgt = meaning + 0.5 * rng.normal(size=(n, d)) + 40 * rng.uniform(1, 2, size=(n, 1)) * shared
    metrics = layer_metrics(src.astype(np.float32), src.astype(np.float32), tgt.astype(np.float32))
    assert metrics["p1_before"] == metrics["p1_after"] < 0.3
    centred = lambda x: x - x.mean(axis=0)  # noqa: E731
    assert metrics["p1_before_centred"] == numpy_p1(centred(src), centred(tgt))
    assert metrics["p1_before_centred"] < 0.5  # the shared direction's spread still hides the meaning ...
    # the "before" figures alone, without a map, are the same two searches
    assert retrieval_p1_raw_and_centred(src.astype(np.float32), tgt.astype(np.float32), "p1_before") == {
        "p1_before": metrics["p1_before"], "p1_before_centred": metrics["p1_before_centred"]}
    without_spread = layer_metrics(meaning + 30.0, meaning + 30.0, meaning + 0.1 * rng.normal(size=(n, d)))
    assert (without_spread["p1_before"] < 0.6
            < without_spread["p1_before_centred"] == 1.0)  # ... the offset alone does not


def test_compare_report_plots_interventions_fitted_on_different_layers(planted_intervention, tmp_path):
    intervention, (X, Y) = planted_intervention
    rows = evaluate_intervention(intervention, X, Y)["layers"]
    comparison = {"data": "synthetic", "interventions": [
        {"intervention": "runs/both", "solver": "ridge", "pooling": "mean", "bytes": 2048, "layers": rows},
        {"intervention": "runs/last", "solver": "ridge", "pooling": "mean", "bytes": 1024, "layers": rows[1:]}]}
    paths = write_compare_report(comparison, tmp_path / "compare")
    best = max(rows, key=lambda r: r["p1_after"])
    assert f"| runs/both | ridge | mean | 2,048 | {best['layer']} |" in paths["markdown"].read_text()
    assert f"| runs/last | ridge | mean | 1,024 | {rows[1]['layer']} |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def test_evaluation_refuses_mismatched_states(planted_intervention):
    intervention, (X, Y) = planted_intervention
    with pytest.raises(ValueError, match="expected"):
        evaluate_intervention(intervention, X[:1], Y[:1])


def test_diagnosis_ranks_a_closer_language_higher(tmp_path):
    rng = np.random.default_rng(2)
    english = rng.normal(size=(3, 60, 16))
    close = english + 0.3 * rng.normal(size=english.shape)
    far = english + 3.0 * rng.normal(size=english.shape)
    report = diagnose_languages({"ita_Latn": (close, english), "zho_Hans": (far, english)}, "eng_Latn", [0, 1, 2])
    ita, zho = report["languages"]["ita_Latn"], report["languages"]["zho_Hans"]
    assert all(a > b for a, b in zip(ita["cosine"], zho["cosine"]))
    assert all(a > b for a, b in zip(ita["p1"], zho["p1"]))
    assert ita["p1"][1] == numpy_p1(close[1], english[1])
    paths = write_diagnosis_report(report, tmp_path / "diag")
    text = paths["markdown"].read_text()
    assert "ita_Latn" in text and "zho_Hans" in text and "P@1" in text
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
