"""The partial sweep design (matrix/design.py): the partner rule, the plan's arithmetic and data check,
the validation on a fully measured block, format 2 of interference.json (measured / completed) and the
API's marks. The tiny partial sweep through Ray is in test_matrix_sweep.py."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lingosteer import config_path
from lingosteer.entrypoints.main import main
from matrix import analysis
from matrix.artifact import InterferenceMatrix, load_interference, save_interference
from matrix.design import (
    choose_k,
    choose_partners,
    complete,
    design_cost,
    design_mask,
    leave_one_pair_out,
    validate_design,
)
from matrix.recommend import recommend_sources
from matrix.sweep import load_records, load_sweep_config

ROOT = Path(__file__).resolve().parent.parent
SERVED = load_sweep_config(config_path("sweep", "served26.yaml")).languages
CPU12 = ROOT / "results" / "sweeps" / "cpu12"


def test_partner_rule_by_hand():
    # Sorted: arb eng fra hin rus ukr urd. arb: its script (urd, which is also Low), then the least-paired
    # language of an uncovered script and family (eng). eng: has arb, adds its script (fra). fra: Italic has no
    # one else, the other resource level is urd. hin: its family (urd), then an uncovered script with no
    # partners yet (rus). rus: its script (ukr). ukr: the other resource level (urd). urd: already 4.
    languages = ["urd_Arab", "eng_Latn", "fra_Latn", "rus_Cyrl", "ukr_Cyrl", "hin_Deva", "arb_Arab"]
    assert choose_partners(languages, 2) == [
        ("arb_Arab", "eng_Latn"), ("arb_Arab", "urd_Arab"), ("eng_Latn", "fra_Latn"), ("fra_Latn", "urd_Arab"),
        ("hin_Deva", "rus_Cyrl"), ("hin_Deva", "urd_Arab"), ("rus_Cyrl", "ukr_Cyrl"), ("ukr_Cyrl", "urd_Arab"),
    ]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_partner_rule_is_deterministic_covers_and_stays_linear(k):
    pairs = choose_partners(SERVED, k)
    shuffled = list(SERVED)
    random.Random(k).shuffle(shuffled)
    assert choose_partners(shuffled, k) == pairs  # the YAML's order does not matter
    assert len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    partners = {code: {b if a == code else a for a, b in pairs if code in (a, b)} for code in SERVED}
    assert all(len(found) >= k for found in partners.values())
    assert len(SERVED) + len(pairs) <= len(SERVED) * (1 + k) <= 6 * len(SERVED)
    if k >= 2:  # every language that shares its script with another has such a partner
        from lingosteer.languages import get_language

        script = {code: get_language(code).script for code in SERVED}
        for code in SERVED:
            if sum(script[o] == script[code] for o in SERVED) > 1:
                assert any(script[p] == script[code] for p in partners[code]), code


def test_design_cost_arithmetic():
    assert design_cost([f"l{i}" for i in range(31)], None).runs == 496  # N + N(N-1)/2
    assert design_cost([f"l{i}" for i in range(204)], None).runs == 20_910
    cost = design_cost(SERVED, 2)
    assert cost.full_runs == 26 + 325 and cost.runs == 26 + len(choose_partners(SERVED, 2))
    assert cost.hours(3600) == cost.runs
    with pytest.raises(ValueError, match="at least 1"):
        choose_partners(SERVED, 0)
    with pytest.raises(ValueError, match="at least 4 languages"):
        choose_partners(["eng_Latn", "fra_Latn", "rus_Cyrl"], 3)


def test_plan_prints_runs_and_cost(capsys):
    assert main(["sweep", "plan", "--config", str(config_path("sweep", "served26.yaml"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = choose_partners(SERVED, 2)
    assert lines[:26] == list(SERVED)  # monolingual runs first
    assert lines[26:26 + len(pairs)] == ["+".join(pair) for pair in pairs]
    text = "\n".join(lines)
    assert "without NTREX-128 (SIB-200 train+dev only): hat_Latn, quy_Latn" in text
    assert "training sentences per run (sentences_per_language: null): 800" in text
    assert f"| k = 2 | {26 + len(pairs)} |" in text and "| full | 351 | 13.5 | 1.95 | 44 |" in text


def test_plan_refuses_a_language_without_data_before_anything_runs(tmp_path, capsys):
    # div_Thaa (Dhivehi) is in the language table but not in FLORES-200, so SIB-200 has no folder for it.
    assert main(["sweep", "plan", "--languages", "eng_Latn,fra_Latn,div_Thaa", "--k", "1"]) == 2
    assert "no corpus data for div_Thaa" in capsys.readouterr().err
    config = tmp_path / "s.yaml"
    config.write_text(f"languages: [eng_Latn, div_Thaa]\ntraining: {config_path('training', 'cpu.yaml')}\n")
    assert main(["sweep", "run", "--config", str(config), "--results", str(tmp_path / "r")]) == 2
    assert "no corpus data for div_Thaa" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before the results directory was made


def _structured(languages, seed=0):
    """A full matrix with row and column effects and a same-script bonus (what completion can learn)."""
    from lingosteer.languages import get_language

    rng = np.random.default_rng(seed)
    scripts = [get_language(code).script for code in languages]
    same = np.array([[a == b for b in scripts] for a in scripts], dtype=float)
    interference = -0.1 + 0.02 * rng.normal(size=(len(languages), 1)) + 0.02 * rng.normal(size=(1, len(languages)))
    interference = interference + 0.04 * same + 0.002 * rng.normal(size=same.shape)
    np.fill_diagonal(interference, 0.0)
    return interference


def test_validation_hides_what_the_design_skips_and_completion_beats_noise():
    languages = SERVED[:14]
    interference = _structured(languages)
    scores = validate_design(interference, languages, ks=[1, 2, 3], random_draws=3)
    for score in scores:
        kept = design_mask(languages, choose_partners(languages, score.k))
        assert score.hidden_entries == int((~kept).sum()) and score.runs == 14 + int(kept.sum() - 14) // 2
    assert scores[-1].mae < 0.01 and scores[-1].spearman > 0.8  # the structure is recovered
    assert choose_k(scores) == min(s.k for s in scores if s.meets_targets)
    noise = np.random.default_rng(1).normal(-0.1, 0.03, size=(14, 14))
    np.fill_diagonal(noise, 0.0)
    assert choose_k(validate_design(noise, languages, ks=[1, 2], random_draws=1)) == 5  # nothing meets: at most 5
    with pytest.raises(ValueError, match="measured in full"):
        validate_design(np.where(kept, interference, np.nan), languages)


def test_validation_on_the_measured_12_language_block(tmp_path, capsys):
    assert main(["sweep", "validate", str(CPU12), "--out", str(tmp_path)]) == 0
    assert "k by the pre-declared rule: 2" in capsys.readouterr().out
    report = json.loads((tmp_path / "validation.json").read_text())
    assert len(report["languages"]) == 12 and report["chosen_k"] == 2
    k2 = next(score for score in report["scores"] if score["k"] == 2)
    assert k2["runs"] == 25 and k2["hidden_entries"] == 106 and k2["mae"] <= 0.01 and k2["spearman"] >= 0.8


def _partial_matrix():
    languages = ("eng_Latn", "fra_Latn", "hin_Deva", "rus_Cyrl", "swh_Latn")
    truth = _structured(languages, seed=3)
    mono = np.array([5.0, 5.5, 6.0, 6.5, 7.0])
    full_loss = mono[:, None] * (1 - truth)  # I = (L[A,A] - L[A,B]) / L[A,A]
    kept = design_mask(languages, choose_partners(languages, 1))
    matrix = InterferenceMatrix.from_loss(languages, np.where(kept, full_loss, np.nan))
    error = leave_one_pair_out(matrix.interference, languages).mae
    return matrix.completed(complete(matrix.interference, languages), {"expected_abs_error": error}), kept


def test_format_2_round_trip_and_format_1_still_loads(tmp_path):
    matrix, kept = _partial_matrix()
    assert np.array_equal(matrix.measured, kept) and not np.isnan(matrix.interference).any()
    path = save_interference(matrix, tmp_path / "i.json")
    document = json.loads(path.read_text())
    assert document["format_version"] == 2 and document["measured"] == kept.tolist()
    assert document["loss"][0][2] is None and document["interference"][0][2] is not None  # completed
    loaded = load_interference(path)
    assert np.array_equal(loaded.measured, kept) and loaded.completion == matrix.completion
    np.testing.assert_allclose(loaded.interference, matrix.interference)

    def broken(change, match):
        bad = json.loads(path.read_text())
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_interference(tmp_path / "bad.json")

    broken(lambda d: d["measured"][0].__setitem__(2, True), "`measured` must be true exactly where")
    broken(lambda d: d.pop("measured"), "`measured` is required")
    broken(lambda d: d.update(format_version=1), "`measured` is required")
    broken(lambda d: d["interference"][0].__setitem__(1, d["interference"][0][1] + 0.1), "does not equal")

    # Format 1, as shipped before partial designs: every known entry is measured.
    old = load_interference(ROOT / "docs" / "sweep" / "cpu12" / "interference.json")
    assert len(old.languages) == 12 and old.measured.all() and old.completion == {}
    assert json.loads((ROOT / "docs" / "sweep" / "cpu12" / "interference.json").read_text())["format_version"] == 1
    partial_v1 = InterferenceMatrix.from_loss(("a", "b"), np.array([[1.0, np.nan], [1.2, 1.0]])).to_json_dict()
    partial_v1.update(format_version=1)
    del partial_v1["measured"], partial_v1["completion"]
    (tmp_path / "v1.json").write_text(json.dumps(partial_v1))
    assert load_interference(tmp_path / "v1.json").measured.tolist() == [[True, False], [True, True]]


def test_recommendations_say_measured_or_completed():
    matrix, kept = _partial_matrix()
    ranked = recommend_sources(matrix, "eng_Latn", k=4)
    assert len(ranked) == 4  # completed pairs are ranked too
    for item in ranked:
        j = matrix.index(item.language)
        assert item.basis == ("measured" if kept[0, j] else "completed")
        assert ("completed (predicted, not measured, expected error" in item.reason) == (item.basis == "completed")
    assert {r.basis for r in ranked} == {"measured", "completed"}
    only = recommend_sources(matrix, "eng_Latn", k=4, measured_only=True)
    assert [r.language for r in only] == [r.language for r in ranked if r.basis == "measured"]


@pytest.fixture()
def partial_client(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from intervene_server.interference_api import interference_router, read_interference

    matrix, kept = _partial_matrix()
    app = FastAPI()
    app.include_router(interference_router(read_interference(save_interference(matrix, tmp_path / "i.json"))))
    return TestClient(app), matrix, kept


def test_api_marks_measured_and_completed_entries(partial_client):
    client, matrix, kept = partial_client
    whole = client.get("/v1/interference").json()
    assert whole["measured"] == kept.tolist() and whole["completion"] == matrix.completion
    english = client.get("/v1/interference/en").json()
    assert english["row_measured"] == dict(zip(matrix.languages, kept[0].tolist()))
    assert english["column_measured"] == dict(zip(matrix.languages, kept[:, 0].tolist()))
    assert english["completed_expected_error"] == pytest.approx(matrix.completion["expected_abs_error"])
    # eng-fra was run (same script), eng-hin was not.
    measured = client.get("/v1/interference/eng_Latn/fra_Latn", params={"measured": True}).json()
    assert measured["measured"] and measured["loss"] == pytest.approx(matrix.loss[0, 1])
    completed = client.get("/v1/interference/eng_Latn/hin_Deva").json()
    assert not completed["measured"] and completed["loss"] is None
    assert completed["interference"] == pytest.approx(matrix.interference[0, 2])
    assert completed["expected_error"] == pytest.approx(matrix.completion["expected_abs_error"])
    refused = client.get("/v1/interference/eng_Latn/hin_Deva", params={"measured": True})
    assert refused.status_code == 404 and "is completed" in refused.text
    ranked = client.get("/v1/interference/recommend", params={"target": "en", "k": 4}).json()["recommendations"]
    assert {r["language"]: r["basis"] for r in ranked} == {
        code: "measured" if kept[0, j] else "completed" for j, code in enumerate(matrix.languages) if j}
    only = client.get("/v1/interference/recommend", params={"target": "en", "k": 4, "measured_only": True}).json()
    assert all(r["basis"] == "measured" for r in only["recommendations"])


def test_shipped_matrix_serves_every_xcopa_and_xnli_language(data_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from intervene_server.interference_api import interference_router, read_interference
    from lingosteer.languages import normalize_code

    matrix = read_interference(config_path("interference", "interference.json"))
    app = FastAPI()
    app.include_router(interference_router(matrix))
    client = TestClient(app)
    codes = {p.name.split(".")[1] for p in (data_dir / "xcopa").glob("val.*.jsonl")}
    codes |= {p.name.split(".")[1] for p in (data_dir / "xnli").glob("dev.*.tsv")}
    assert len(codes) >= 20
    for code in sorted(codes):
        response = client.get("/v1/interference/recommend", params={"target": code})
        assert response.status_code == 200, (code, response.text)
        assert normalize_code(code) in matrix.languages
    for code in matrix.languages:
        assert client.get(f"/v1/interference/{code}").status_code == 200
    runs = matrix.metadata["runs"]["planned"]
    assert runs <= 6 * len(matrix.languages) and matrix.completion["expected_abs_error"] <= 0.01


def test_loss_matrix_of_a_partial_sweep_leaves_skipped_pairs_unmeasured():
    manifest, records = load_records(CPU12)
    languages = tuple(manifest["identity"]["languages"])
    pairs = set(choose_partners(languages, 2))
    kept = [r for r in records if len(r["languages"]) == 1 or tuple(sorted(r["languages"])) in pairs]
    loss = analysis.loss_matrix(kept, languages)
    assert np.array_equal(~np.isnan(loss), design_mask(languages, sorted(pairs)))
