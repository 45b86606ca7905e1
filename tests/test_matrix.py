"""matrix/: formulas on hand-made matrices, the artifact's validation, recommendation and completion
on synthetic matrices with known answers, run planning."""

import json

import numpy as np
import pytest

from matrix import analysis
from matrix.artifact import InterferenceMatrix, interference_from_loss, load_interference, save_interference
from matrix.completion import evaluate_completion, fit_completion, predict_same_script_mean
from matrix.recommend import recommend_sources
from matrix.sweep import parse_pairs, plan_runs

LANGS = ("aaa_Latn", "bbb_Latn", "ccc_Cyrl")
# Row = evaluated language, column = added language; diagonal = monolingual loss.
LOSS = np.array(
    [
        [2.0, 2.2, 2.4],
        [3.3, 3.0, 3.6],
        [4.0, 4.4, 4.0],
    ]
)


def test_interference_formula_on_hand_made_loss():
    expected = np.array(
        [
            [0.0, -0.1, -0.2],  # (2.0 - 2.2) / 2.0, (2.0 - 2.4) / 2.0
            [-0.1, 0.0, -0.2],  # (3.0 - 3.3) / 3.0, (3.0 - 3.6) / 3.0
            [0.0, -0.1, 0.0],  # (4.0 - 4.0) / 4.0, (4.0 - 4.4) / 4.0
        ]
    )
    np.testing.assert_allclose(interference_from_loss(LOSS), expected, atol=1e-12)
    matrix = InterferenceMatrix.from_loss(LANGS, LOSS)
    np.testing.assert_allclose(matrix.robustness, [-0.15, -0.15, -0.05])  # row means without the diagonal
    np.testing.assert_allclose(matrix.friendliness, [-0.05, -0.1, -0.2])  # column means without the diagonal


def test_unmeasured_entries_stay_unknown():
    loss = LOSS.copy()
    loss[0, 2] = np.nan  # pair not run
    loss[1, 1] = np.nan  # no monolingual run: nothing in row 1 is known
    interference = interference_from_loss(loss)
    assert np.isnan(interference[0, 2]) and np.isnan(interference[1]).all()
    assert interference[0, 1] == pytest.approx(-0.1)
    matrix = InterferenceMatrix.from_loss(LANGS, loss)
    assert matrix.robustness[0] == pytest.approx(-0.1)


def test_loss_matrix_from_run_records():
    records = [
        {"languages": ["aaa_Latn"], "loss": {"aaa_Latn": 2.0}},
        {"languages": ["bbb_Latn"], "loss": {"bbb_Latn": 3.0}},
        {"languages": ["aaa_Latn", "bbb_Latn"], "loss": {"aaa_Latn": 2.2, "bbb_Latn": 3.3}},
        {"languages": ["aaa_Latn", "zzz_Latn"], "loss": {"aaa_Latn": 9.0, "zzz_Latn": 9.0}},  # outside the set
    ]
    loss = analysis.loss_matrix(records, LANGS)
    np.testing.assert_allclose(loss[:2, :2], [[2.0, 2.2], [3.3, 3.0]])
    assert np.isnan(loss[2]).all() and np.isnan(loss[:, 2]).all()


def test_artifact_round_trip_and_validation(tmp_path):
    loss = LOSS.copy()
    loss[2, 0] = np.nan
    matrix = InterferenceMatrix.from_loss(LANGS, loss, {"note": "hand-made", "nan": float("nan")})
    path = save_interference(matrix, tmp_path / "interference.json")
    data = json.loads(path.read_text())
    assert data["loss"][2][0] is None and data["metadata"]["nan"] is None
    loaded = load_interference(path)
    assert loaded.languages == LANGS
    np.testing.assert_allclose(loaded.interference, matrix.interference, equal_nan=True)

    def broken(change, match):
        bad = json.loads(path.read_text())
        change(bad)
        target = tmp_path / "bad.json"
        target.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_interference(target)

    broken(lambda d: d.update(format_version=99), "format_version")
    broken(lambda d: d["loss"].pop(), "3 x 3")
    broken(lambda d: d.update(languages=["aaa_Latn", "aaa_Latn", "ccc_Cyrl"]), "duplicates")
    broken(lambda d: d["interference"][0].__setitem__(1, -0.5), "does not equal")
    broken(lambda d: d["interference"][0].__setitem__(0, 0.3), "diagonal")
    broken(lambda d: d["loss"][0].__setitem__(1, "x"), r"'loss\[0\]\[1\]': Input should be a valid number")
    broken(lambda d: d["loss"][0].__setitem__(1, float("inf")), "finite number")
    broken(lambda d: d.update(metadata=[]), "'metadata'")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_interference(tmp_path / "garbage.json")
    with pytest.raises(FileNotFoundError):
        load_interference(tmp_path / "missing.json")


def test_iqr_outliers():
    values = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 5.0, np.nan])
    mask, (low, high) = analysis.iqr_outliers(values)
    # Q1 = 1.125, Q3 = 1.375, IQR = 0.25 -> bounds [0.75, 1.75]
    assert (low, high) == pytest.approx((0.75, 1.75))
    assert mask.tolist() == [False, False, False, False, False, True, False]


def test_group_means_and_same_vs_different():
    scripts = ["Latin", "Latin", "Cyrillic", "Cyrillic"]
    same = np.array([[s == t for t in scripts] for s in scripts])
    interference = np.where(same, -0.01, -0.1)
    np.fill_diagonal(interference, 0.0)
    groups, block = analysis.group_means(interference, scripts)
    assert groups == ["Cyrillic", "Latin"]
    np.testing.assert_allclose(block, [[-0.01, -0.1], [-0.1, -0.01]])
    comparison = analysis.same_vs_different(interference, scripts, permutations=200)
    assert (comparison.same_mean, comparison.different_mean) == pytest.approx((-0.01, -0.1))
    assert (comparison.same_count, comparison.different_count) == (4, 8)
    # Every permutation of 2+2 labels either reproduces the split or mixes it: p is the share that
    # reproduce it (1 in 3 labelings), so not tiny with 4 languages, but not 1 either.
    assert comparison.p_value < 0.5
    groups, _ = analysis.group_means(interference, scripts, min_size=3)
    assert groups == []


def test_asymmetry_statistics():
    rng = np.random.default_rng(0)
    symmetric = rng.normal(-0.05, 0.02, size=(5, 5))
    symmetric = (symmetric + symmetric.T) / 2
    np.fill_diagonal(symmetric, 0.0)
    matrix = InterferenceMatrix(tuple("abcde"), np.ones((5, 5)), symmetric)
    result = analysis.asymmetry(symmetric, matrix.robustness, matrix.friendliness)
    assert result.pairs == 10 and result.mean_abs_difference == pytest.approx(0.0)
    assert result.correlation == pytest.approx(1.0) and result.sign_disagreement == 0.0
    assert result.robustness_friendliness_correlation == pytest.approx(1.0)
    skewed = symmetric.copy()
    skewed[0, 1], skewed[1, 0] = 0.05, -0.05
    result = analysis.asymmetry(skewed, matrix.robustness, matrix.friendliness)
    assert result.mean_abs_difference == pytest.approx(0.1 / 10)
    assert result.sign_disagreement == pytest.approx(0.1)


def _synthetic(n=10, seed=0):
    """A matrix with a known structure: row/column effects, a same-script bonus, a rank-1 remainder."""
    rng = np.random.default_rng(seed)
    scripts = ["Latin"] * 4 + ["Cyrillic"] * 3 + ["Arabic"] * 3
    families = ["F1", "F1", "F2", "F2", "F1", "F3", "F3", "F2", "F3", "F1"][:n]
    same = np.array([[a == b for b in scripts] for a in scripts], dtype=float)
    u, v = rng.normal(size=n), rng.normal(size=n)
    row_effect, column_effect = rng.normal(size=(n, 1)), rng.normal(size=(1, n))
    interference = -0.05 + 0.02 * row_effect + 0.02 * column_effect + 0.03 * same + 0.01 * np.outer(u, v)
    np.fill_diagonal(interference, 0.0)
    return interference, scripts, families


def test_completion_recovers_a_structured_matrix():
    interference, scripts, families = _synthetic()
    hidden = interference.copy()
    hidden[0, 5] = hidden[5, 0] = hidden[2, 3] = hidden[3, 2] = np.nan
    predicted = fit_completion(hidden, scripts, families, rank=1, reg=1e-4, iterations=200).predict()
    for a, b in [(0, 5), (5, 0), (2, 3), (3, 2)]:
        assert predicted[a, b] == pytest.approx(interference[a, b], abs=0.004)
    scores = {s.method: s for s in evaluate_completion(interference, scripts, families, repeats=5)}
    completion = scores["completion (low rank + script/family)"]
    assert completion.mae < 0.5 * scores["same-script mean"].mae
    assert completion.mae < 0.5 * scores["global mean"].mae


def test_same_script_proxy_is_exact_on_a_pure_script_matrix():
    scripts = ["Latin", "Latin", "Cyrillic", "Cyrillic", "Arabic"]
    same = np.array([[a == b for b in scripts] for a in scripts])
    interference = np.where(same, -0.02, -0.08)
    np.fill_diagonal(interference, 0.0)
    hidden = interference.copy()
    hidden[0, 1] = hidden[2, 4] = np.nan
    predicted = predict_same_script_mean(hidden, scripts)
    np.testing.assert_allclose(predicted, interference)


def test_recommendation_on_a_known_matrix():
    languages = ("tgt", "good", "one_sided", "bad", "unmeasured")
    loss = np.array(
        [
            [1.0, 1.01, 1.00, 1.3, np.nan],  # target: good and one_sided barely hurt it, bad does
            [1.01, 1.0, 1.0, 1.0, 1.0],  # target hardly hurts good
            [1.5, 1.0, 1.0, 1.0, 1.0],  # target hurts one_sided a lot
            [1.2, 1.0, 1.0, 1.0, 1.0],
            [np.nan, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    matrix = InterferenceMatrix.from_loss(languages, loss)
    ranked = recommend_sources(matrix, "tgt", k=5)
    assert [r.language for r in ranked] == ["good", "bad", "one_sided"]  # unmeasured left out
    best = ranked[0]
    assert best.rank == 1 and best.target_from_source == pytest.approx(-0.01)
    assert best.source_from_target == pytest.approx(-0.01) and best.score == pytest.approx(-0.01)
    assert "good" in best.reason and "tgt" in best.reason
    assert [r.language for r in recommend_sources(matrix, "tgt", k=1, candidates=["bad", "one_sided"])] == ["bad"]
    with pytest.raises(ValueError, match="did you mean tgt"):
        recommend_sources(matrix, "tgtt")
    with pytest.raises(ValueError, match="own source"):
        recommend_sources(matrix, "tgt", candidates=["tgt"])


def test_plan_runs_and_pair_parsing():
    languages = tuple(f"l{i}" for i in range(12))
    runs = plan_runs(languages)
    assert len(runs) == 12 + 66 and len(set(runs)) == 78
    assert runs[:12] == [(lang,) for lang in languages]
    partial = plan_runs(("a", "b", "c", "d"), pairs=[("c", "a"), ("a", "c")])
    assert partial == [("a",), ("c",), ("a", "c")]
    with pytest.raises(ValueError, match="not in the sweep"):
        plan_runs(("a", "b"), pairs=[("a", "z")])
    assert parse_pairs("eng_Latn-fra_Latn, sw-hin_Deva") == [("eng_Latn", "fra_Latn"), ("swh_Latn", "hin_Deva")]
    with pytest.raises(ValueError, match="CODE-CODE"):
        parse_pairs("eng_Latn")


def test_permutation_p_value_separates_groups():
    labels = ["High"] * 6 + ["Low"] * 6
    separated = np.array([0.0, 0.1, 0.05, 0.02, 0.08, 0.03, -1.0, -1.1, -0.9, -1.05, -0.95, -1.02])
    assert analysis.permutation_p_value(separated, labels, "High", "Low") < 0.01
    assert analysis.permutation_p_value(np.zeros(12), labels, "High", "Low") == 1.0
    assert np.isnan(analysis.permutation_p_value(separated, labels, "High", "Missing"))
