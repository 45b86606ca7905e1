"""bench/gate_real_data.py's report, on planted outcomes (no engine, no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gate_real_data as real

STEERED = {"steered": True, "serving": "alpha +0.5, layers 6-11, positions last", "design": "pooled",
           "decision": "on: ...", "calibration_items": 100, "calibration_file": "dev.th.tsv"}
OFF = {**STEERED, "steered": False, "serving": "off", "decision": "off: no gain detectable; ..."}


def _outcome(items: int, plain_only: int, steered_only: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """`plain_only` items right only plain, `steered_only` only steered, `both` right under both."""
    plain, steered = np.zeros(items, bool), np.zeros(items, bool)
    plain[:plain_only] = True
    steered[plain_only:plain_only + steered_only] = True
    plain[-both:] = steered[-both:] = True
    return plain, steered


def test_a_steered_language_that_loses_is_flagged():
    row = real.language_row("th", STEERED, _outcome(500, 60, 20, 150), resamples=2000)
    assert row["plain_accuracy"] == pytest.approx(0.42) and row["steered_accuracy"] == pytest.approx(0.34)
    assert row["difference"] == pytest.approx(-0.08) and row["ci95"][1] < 0
    assert row["significantly_worse"] and row["mcnemar_p"] < 0.001
    assert (row["plain_only"], row["steered_only"], row["items"]) == (60, 20, 500)


@pytest.mark.parametrize("plain_only, steered_only", [(25, 20), (20, 20), (10, 40)])
def test_a_steered_language_within_noise_or_better_is_not_flagged(plain_only, steered_only):
    row = real.language_row("sw", STEERED, _outcome(500, plain_only, steered_only, 150), resamples=2000)
    assert not row["significantly_worse"] and row["ci95"][1] >= 0
    assert row["ci95"][0] <= row["difference"] <= row["ci95"][1]


def test_a_language_kept_off_is_plain_by_construction_and_not_scored():
    row = real.language_row("de", OFF, None)
    assert row["difference"] == 0.0 and not row["significantly_worse"] and row["items"] == 0
    assert row["plain_accuracy"] is None and "plain by construction" in row["note"]
    with pytest.raises(ValueError, match="off: it serves plain"):
        real.language_row("de", OFF, _outcome(10, 1, 1, 2))
    with pytest.raises(ValueError, match="steered but its unseen items were not scored"):
        real.language_row("th", STEERED, None)


def test_the_summary_meets_the_target_only_when_no_language_is_significantly_worse():
    good = [real.language_row("sw", STEERED, _outcome(500, 20, 25, 150), resamples=1000),
            real.language_row("de", OFF, None)]
    result = real.summarize(good, model="m")
    assert result["target_met"] and result["significantly_worse"] == []
    assert result["steered"] == ["sw"] and result["off"] == ["de"] and result["model"] == "m"
    bad = [*good, real.language_row("th", STEERED, _outcome(500, 60, 20, 150), resamples=1000)]
    result = real.summarize(bad)
    assert not result["target_met"] and result["significantly_worse"] == ["th"]
    text = real.markdown(result)
    assert "target missed: significantly worse: th" in text and "0 (plain by construction)" in text
    assert "| th | alpha +0.5, layers 6-11, positions last | 500 | 0.420 | 0.340 | -8.0 [" in text
    json.dumps(result)  # result.json is plain JSON


def test_the_commands_name_the_calibration_and_the_unseen_items(tmp_path):
    files = {"sw": tmp_path / "dev.sw.tsv", "th": tmp_path / "dev.th.tsv"}
    build = real.build_command("gemma-3-270m", files, tmp_path / "a", 100, "float32")
    assert build[:2] == ["align", "build"] and build[build.index("--source") + 1] == "sw,th"
    assert build[build.index("--calibration-max-items") + 1] == "100" and "--gate-design" not in build  # the default
    one = real.build_command("gemma-3-270m", {"th": files["th"]}, tmp_path / "a", 100, "float32")
    assert one[one.index("--out") + 1] == str(tmp_path / "a" / "tha_Thai")  # where `decisions` reads it
    bench = real.bench_command("gemma-3-270m", tmp_path / "a", {"th": files["th"]}, 100, 500, tmp_path / "b", "float32")
    assert bench[:2] == ["bench", "xnli"] and bench[bench.index("--skip-items") + 1] == "100"
    assert bench[bench.index("--max-items") + 1] == "500" and bench[bench.index("--eval") + 1] == str(files["th"])


def test_missing_files_and_english_are_refused(tmp_path):
    (tmp_path / "dev.sw.tsv").write_text("a\tb\tentailment\n")
    assert real.xnli_files(tmp_path, ["sw"]) == {"sw": tmp_path / "dev.sw.tsv"}
    with pytest.raises(FileNotFoundError, match="dev.th.tsv"):
        real.xnli_files(tmp_path, ["sw", "th"])
    with pytest.raises(ValueError, match="English"):
        real.xnli_files(tmp_path, ["en"])


def test_outcomes_are_read_per_language_from_the_bench_items(tmp_path):
    items = tmp_path / "items.jsonl"
    rows = [{"language": "th", "baseline_correct": True, "intervened_correct": False},
            {"language": "th", "baseline_correct": False, "intervened_correct": False},
            {"language": "sw", "baseline_correct": False, "intervened_correct": True}]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outcomes = real.read_outcomes(items)
    assert outcomes["th"][0].tolist() == [True, False] and outcomes["th"][1].tolist() == [False, False]
    assert outcomes["sw"][1].tolist() == [True]
