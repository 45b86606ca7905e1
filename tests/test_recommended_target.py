"""bench/recommended_target.py: the selection rule on the shipped matrix, refusals, the figures, a tiny smoke run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lingosteer import REPO_ROOT
from lingosteer.languages import get_language
from matrix.artifact import load_interference

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# What the rule selects on configs/interference/interference.json (docs/sweep.md quotes it): L -> R.
SHIPPED_SELECTION = {"rus_Cyrl": "ukr_Cyrl", "bul_Cyrl": "rus_Cyrl", "spa_Latn": "fra_Latn",
                     "urd_Arab": "hin_Deva", "ita_Latn": "fra_Latn", "arb_Arab": "tur_Latn"}


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(REPO_ROOT / "bench"))  # it imports lowrank_quality as the script does
    try:
        path = REPO_ROOT / "bench" / "recommended_target.py"
        spec = importlib.util.spec_from_file_location("recommended_target", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["recommended_target"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("recommended_target", None)
        sys.path.remove(str(REPO_ROOT / "bench"))


@pytest.fixture(scope="module")
def matrix(script):
    return load_interference(script.DEFAULT_MATRIX)


def test_rule_on_the_shipped_matrix_gives_six_languages_none_recommending_english(script, matrix, data_dir):
    chosen, excluded = script.select_languages(matrix, data_dir)
    assert len(chosen) == 6 == len({c.language for c in chosen})
    for c in chosen:
        assert c.language != "eng_Latn" and c.target != "eng_Latn" and c.target != c.language
        assert get_language(c.target).resource == "High" and c.target in matrix.languages
        assert c.margin > 0 and c.english_rank > 1  # R outranks English in L's ranking
        assert script.data_problem(c.language, data_dir) is None and script.data_problem(c.target, data_dir) is None
    assert [c.margin for c in chosen] == sorted((c.margin for c in chosen), reverse=True)
    assert {c.language: c.target for c in chosen} == SHIPPED_SELECTION
    # every served language is either chosen or left out with a reason
    served = set(script.served_languages(data_dir)) - {"eng_Latn"}
    assert served == {c.language for c in chosen} | set(excluded)
    assert "NTREX" in excluded["hat_Latn"] and "NTREX" in excluded["quy_Latn"]
    assert "English" in excluded["deu_Latn"]  # its recommended high-resource language is English
    assert not set(SHIPPED_SELECTION) & set(excluded)


def test_recommended_language_is_the_first_high_resource_source(script, matrix):
    from matrix.recommend import recommend_sources

    choice = script.recommend_target(matrix, "sw")
    high = [c for c in script.high_resource(matrix) if c != "swh_Latn"]
    assert choice.target == recommend_sources(matrix, "swh_Latn", k=1, candidates=high)[0].language
    assert choice.unrestricted == recommend_sources(matrix, "swh_Latn", k=1)[0].language
    assert get_language(choice.unrestricted).resource != "High"  # why the rule restricts to High: Welsh here


def test_languages_without_data_or_without_a_comparison_are_refused(script, matrix, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"ht \(hat_Latn\).*no NTREX-128 data"):
        script.resolve_languages(matrix, data_dir, ["sw", "ht"])
    with pytest.raises(ValueError, match="recommended high-resource language is English"):
        script.resolve_languages(matrix, data_dir, ["de"])
    with pytest.raises(ValueError, match="English is the target"):
        script.resolve_languages(matrix, data_dir, ["en"])
    with pytest.raises(ValueError, match="afr_Latn is not in the interference matrix"):
        script.resolve_languages(matrix, data_dir, ["af"])
    with pytest.raises(ValueError, match="xx: "):
        script.resolve_languages(matrix, data_dir, ["xx"])
    (tmp_path / "sib200" / "eng_Latn").mkdir(parents=True)  # a data root without Swahili
    with pytest.raises(ValueError, match="swh_Latn has no SIB-200"):
        script.resolve_languages(matrix, tmp_path, ["sw"])
    assert [c.target for c in script.resolve_languages(matrix, data_dir, ["sw", "it"])] == ["tur_Latn", "fra_Latn"]


def test_figures_pair_the_two_targets_sentence_by_sentence(script):
    rng = np.random.default_rng(0)
    hits = {code: {t: {w: rng.random((3, 40)) < p for w, p in (("before", 0.3), ("after", 0.6))}
                   for t in script.TARGETS} for code in ("a", "b")}
    per_language, mean = script.summarise(hits, resamples=300, seed=0)
    for figures in [*per_language.values(), mean]:
        for group in (*script.TARGETS, "recommended_minus_english"):
            for key, f in figures[group].items():
                if isinstance(f, dict):
                    assert f["ci95"][0] <= f["value"] <= f["ci95"][1], (group, key)
        d = figures["recommended_minus_english"]
        gain = figures["recommended"]["gain"]["value"] - figures["english"]["gain"]["value"]
        assert d["gain"]["value"] == pytest.approx(gain)
        assert d["reading"] == script.reading(d["gain"])
    a = per_language["a"]["english"]
    assert a["p1_after"]["value"] == pytest.approx(hits["a"]["english"]["after"].mean())
    assert len(a["p1_after_per_layer"]) == 3 and a["p1_after_best_layer"] == max(a["p1_after_per_layer"])
    assert script.reading({"ci95": [0.01, 0.1]}).startswith("toward R gains more")
    assert script.reading({"ci95": [-0.1, -0.01]}).startswith("toward English gains more")
    assert script.reading({"ci95": [-0.1, 0.1]}).startswith("no difference")


def test_smoke_on_the_tiny_model(tiny_model_dir, data_dir, tmp_path):
    model = tiny_model_dir("llama")
    done = subprocess.run(
        [sys.executable, "bench/recommended_target.py", "--model", str(model), "--languages", "sw,it",
         "--fit-data", "sib200:dev", "--pairs", "30", "--bootstrap", "200", "--data", str(data_dir),
         "--out", str(tmp_path), "--no-progress", "--json"],
        capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # the whole of stdout is one object
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "result.png").stat().st_size > 0
    assert "Measured, no target" in (tmp_path / "result.md").read_text()
    assert result["status"] == "measured, no target" and result["languages"] == ["swh_Latn", "ita_Latn"]
    assert [c["target"] for c in result["choices"]] == ["tur_Latn", "fra_Latn"]
    split = result["ntrex_split"]
    assert len(split["indices"]) == 30 == len(set(split["indices"]))
    for code in result["languages"]:
        row = result["results"][code]
        fits = row["fits"]
        assert fits["english"]["target"] == "eng_Latn" and fits["recommended"]["target"] == row["recommended_language"]
        assert fits["english"]["fit_pairs"] == fits["recommended"]["fit_pairs"] > 50
        for t in ("english", "recommended"):
            assert len(row[t]["p1_after_per_layer"]) == len(result["layers"])
            assert 0 <= row[t]["p1_before"]["value"] <= 1
        d = row["recommended_minus_english"]["gain"]
        assert d["value"] == pytest.approx(row["recommended"]["gain"]["value"] - row["english"]["gain"]["value"])
    assert result["selection_rule"].startswith("Languages: those the project serves")
