"""bench/lowrank_quality.py on the tiny Llama: one JSON object on stdout, and a rank-d map is the full map."""

import importlib.util
import json
import os
import subprocess
import sys

from lingosteer import REPO_ROOT
from lingosteer.fingerprint import model_fingerprint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FIGURES = ("p1", "p1_ci95", "p1_drop_vs_full", "p1_drop_vs_full_ci95", "choice_change_vs_full",
           "choice_change_vs_full_ci95", "choice_change_vs_plain", "choice_change_vs_plain_ci95", "accuracy",
           "accuracy_ci95")


def _script():
    spec = importlib.util.spec_from_file_location("lowrank_quality", REPO_ROOT / "bench" / "lowrank_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rule_takes_the_smallest_rank_within_both_limits():
    rule = _script().apply_rule

    def mean(drop, change):
        return {"p1_drop_vs_full": drop, "choice_change_vs_full": change}

    means = {"16": mean(0.02, 0.01), "32": mean(0.01, 0.03), "64": mean(0.005, 0.02), "128": mean(0.0, 0.0)}
    decision = rule(means, [16, 32, 64, 128])
    assert (decision["serving_form"], decision["rank"]) == ("rank 64", 64)
    assert [r["passes"] for r in decision["per_rank"].values()] == [False, False, True, True]
    none = rule({"16": mean(0.011, 0.0), "32": mean(0.0, 0.021)}, [16, 32])  # just past each limit
    assert (none["serving_form"], none["rank"]) == ("full", None)


def test_lowrank_quality_json_and_rank_d_reproduces_full(tiny_model_dir, data_dir, tmp_path):
    model = tiny_model_dir("llama")
    d = model_fingerprint(model)["hidden_size"]
    done = subprocess.run(
        [sys.executable, "bench/lowrank_quality.py", "--model", str(model), "--langs", "sw,id", "--ranks", f"8,{d}",
         "--fit-data", "sib200:dev", "ntrex:0-39", "--eval-pairs", "30", "--xcopa-items", "8", "--bootstrap", "200",
         "--data-dir", str(data_dir), "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # the whole of stdout is one object
    assert result == json.loads((tmp_path / "lowrank.json").read_text())
    assert (tmp_path / "lowrank.png").stat().st_size > 0 and "Decision" in (tmp_path / "lowrank.md").read_text()

    forms = ["full", "8", str(d)]
    assert result["forms"] == forms and result["languages"] == ["sw", "id"]
    split = result["ntrex_split"]
    assert split["seed"] == 0 and len(split["indices"]) == 30 == len(set(split["indices"]))
    assert min(split["indices"]) >= 40  # never a fitted NTREX line
    assert result["xcopa"]["split"] == "validation" and all(
        os.path.basename(path).startswith("val.") for path in result["xcopa"]["files"].values())
    for code in ("sw", "id"):
        rows = result["results"][code]["forms"]
        for form in forms:
            row = rows[form]
            assert set(FIGURES) <= set(row) and len(row["p1_per_layer"]) == len(result["layers"])
            for key in FIGURES:
                if key.endswith("_ci95"):
                    low, high = row[key]
                    assert low <= row[key[: -len("_ci95")]] <= high, (code, form, key)
        assert rows["full"]["choice_change_vs_full"] == 0.0
        assert rows["full"]["loglik_mean_abs_change_vs_plain"] > 1e-3  # the maps did steer the engine
        # rank d keeps every direction of W - I: the full map, to rounding
        assert rows[str(d)]["p1_per_layer"] == rows["full"]["p1_per_layer"]
        assert rows[str(d)]["p1"] == rows["full"]["p1"] and rows[str(d)]["p1_drop_vs_full"] == 0.0
        assert rows[str(d)]["choice_change_vs_full"] == 0.0
        assert rows[str(d)]["loglik_max_abs_diff_vs_full"] < 1e-3 < rows["8"]["loglik_max_abs_diff_vs_full"]
    assert result["mean"][str(d)]["p1"] == result["mean"]["full"]["p1"]

    decision = result["decision"]
    passing = [r for r in (8, d) if decision["per_rank"][str(r)]["passes"]]
    assert decision["rank"] == (passing[0] if passing else None)
    assert decision["per_rank"][str(d)]["passes"]  # nothing lost: within both limits
    assert result["selection_rule"].startswith("The default serving form is rank r")
    assert len(result["load_average"]["start"]) == 3 and result["wall_seconds"] > 0
