"""`lingosteer align fit | eval | diagnose` end to end on a tiny model with real SIB-200 sentences."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alignment.artifact import FORMAT_VERSION, ServingDefaults, load_intervention
from lingosteer.entrypoints.main import main
from lingosteer.fingerprint import model_fingerprint
from plugin_support import planted_evidence


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, data_dir, tmp_path_factory):
    """One fit shared by the tests below: 40 swh->eng pairs from SIB-200 train, layers 0 and 1."""
    model_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("align") / "swh_Latn"
    code = main(["align", "fit", "--model", str(model_dir), "--source", "sw", "--target", "eng_Latn",
                 "--data", f"sib200:train@{data_dir}", "--max-pairs", "40", "--chunk-size", "16",
                 "--layers", "0-1", "--bias", "--dtype", "bfloat16", "--alpha", "0.5", "--out", str(out)])
    assert code == 0
    return model_dir, out


def test_fit_writes_a_valid_artifact(fitted, data_dir):
    model_dir, out = fitted
    intervention = load_intervention(out, expected_fingerprint=model_fingerprint(model_dir))
    manifest = intervention.manifest
    assert (manifest.source, manifest.target) == ("swh_Latn", "eng_Latn")  # "sw" normalised
    assert manifest.layers == [0, 1] and manifest.dtype == "bfloat16" and manifest.serving.alpha == 0.5
    assert manifest.fit_data.num_pairs == 40 and manifest.fit_data.num_heldout == 8
    assert manifest.fit_data.sources[0]["corpus"] == "sib200" and manifest.fit_data.sources[0]["splits"] == ["train"]
    assert set(manifest.metrics["heldout_error_ratio"]) == {"0", "1"}
    assert all(lam > 0 for lam in manifest.lambdas)
    assert manifest.bias is True and manifest.standardise is False


def test_eval_json_is_one_object_on_stdout(fitted, data_dir, tmp_path):
    model_dir, out = fitted
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lingosteer.entrypoints.main",
         "align", "eval", "--model", str(model_dir), "--intervention", str(out),
         "--data", f"sib200:test@{data_dir}", "--max-pairs", "30", "--json", "--report-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["source"] == "swh_Latn" and report["target"] == "eng_Latn" and report["num_pairs"] == 30
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    for row in report["layers"]:
        for key in ("cosine_before", "cosine_after", "p1_before", "p1_after"):
            assert isinstance(row[key], float)
        assert 0.0 <= row["p1_before"] <= 1.0 and 0.0 <= row["p1_after"] <= 1.0
        assert row["p1_before"] * 30 == pytest.approx(round(row["p1_before"] * 30))  # a fraction of 30 pairs
    assert (tmp_path / "r" / "eval.json").is_file() and (tmp_path / "r" / "eval.png").is_file()
    assert "warning" not in result.stderr  # train vs test: no overlap


def test_eval_on_fitting_data_warns(fitted, data_dir, capsys):
    model_dir, out = fitted
    assert main(["align", "eval", "--model", str(model_dir), "--intervention", str(out),
                 "--data", f"sib200:train@{data_dir}", "--max-pairs", "10"]) == 0
    captured = capsys.readouterr()
    assert "overlaps the fitting data" in captured.err
    assert "| layer |" in captured.out and (out / "eval-sib200-train" / "eval.md").is_file()


def test_eval_with_another_model_is_refused(fitted, tiny_model_dir, data_dir, capsys):
    _, out = fitted
    code = main(["align", "eval", "--model", str(tiny_model_dir("qwen2")), "--intervention", str(out),
                 "--data", f"sib200:test@{data_dir}", "--max-pairs", "5"])
    assert code == 2
    assert "different model" in capsys.readouterr().err


def test_diagnose_writes_table_and_plot(tiny_model_dir, data_dir, tmp_path, capsys):
    assert main(["align", "diagnose", "--model", str(tiny_model_dir("llama")), "--langs", "swh_Latn,ita_Latn",
                 "--data", f"sib200:dev@{data_dir}", "--max-pairs", "12", "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert set(report["languages"]) == {"swh_Latn", "ita_Latn"} and report["layers"] == [0, 1]
    assert all(len(v["p1"]) == 2 and v["num_pairs"] == 12 for v in report["languages"].values())
    assert "swh_Latn" in capsys.readouterr().out and (tmp_path / "d" / "diagnose.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "xx_Nope"], "unknown language"),
        (["--source", "swh_Latn", "--layers", "0,7"], "do not exist"),
        (["--source", "swh_Latn", "--layers", "two"], "bad layer list"),
        (["--source", "eng_Latn"], "same language"),
        (["--source", "swh_Latn", "--rank", "0"], "rank"),
        (["--source", "swh_Latn", "--solver", "meanshift", "--rank", "4"], "rank applies to the ridge and lstsq"),
        (["--source", "swh_Latn", "--solver", "meanshift", "--no-bias"], "bias=False does not apply"),
        (["--source", "swh_Latn", "--solver", "lstsq", "--standardise"], "standardise applies to the ridge solver"),
        (["--source", "quy_Latn", "--data", "ntrex"], "no NTREX-128 file for language 'quy_Latn'"),
    ],
)
def test_bad_fit_input_is_one_clear_line(tiny_model_dir, data_dir, tmp_path, capsys, extra, message):
    data = [] if "--data" in extra else ["--data", f"sib200:dev@{data_dir}"]
    code = main(["align", "fit", "--model", str(tiny_model_dir("llama")), *data,
                 "--max-pairs", "10", "--out", str(tmp_path / "x"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "x").exists()


def test_fit_mixes_sources_and_a_ray_fit_equals_the_single_process_fit(tiny_model_dir, data_dir, tmp_path):
    """Two sources (SIB-200 dev + NTREX lines 0-9), 30 pairs, fitted once in this process and
    once as two local Ray shards: the statistics merge exactly, so the maps agree."""
    from safetensors.numpy import load_file

    model_dir = tiny_model_dir("llama")
    common = ["align", "fit", "--model", str(model_dir), "--source", "sw", "--data", f"sib200:dev@{data_dir}",
              "--data", f"ntrex:0-9@{data_dir}", "--max-pairs", "30", "--layers", "0-1", "--chunk-size", "8"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--ray", "--ray-workers", "2", "--out", str(tmp_path / "ray")]) == 0
    local, ray = (load_intervention(tmp_path / name) for name in ("local", "ray"))
    sources = local.fit_data.sources
    assert [s["corpus"] for s in sources] == ["sib200", "ntrex"] and sources[1]["lines"] == [0, 9]
    assert local.fit_data.num_pairs == 30 and local.fit_data.recipe == "custom"
    assert ray.manifest.lambdas == pytest.approx(local.manifest.lambdas, rel=1e-9)
    local_tensors, ray_tensors = (load_file(str(tmp_path / name / "matrices.safetensors")) for name in ("local", "ray"))
    assert local_tensors.keys() == ray_tensors.keys()
    for name in local_tensors:
        np.testing.assert_allclose(ray_tensors[name], local_tensors[name], atol=1e-5)


def test_fit_without_solver_or_data_options_uses_the_recommended_recipe(tiny_model_dir, tmp_path):
    from alignment.recipe import RECOMMENDED

    out = tmp_path / "default"
    assert main(["align", "fit", "--model", str(tiny_model_dir("llama")), "--source", "sw", "--max-pairs", "20",
                 "--out", str(out)]) == 0
    manifest = load_intervention(out).manifest
    assert [s["spec"] for s in manifest.fit_data.sources] == list(RECOMMENDED.data)
    assert manifest.fit_data.recipe == "recommended"
    assert (manifest.solver, manifest.pooling) == (RECOMMENDED.solver, RECOMMENDED.pooling)


def test_build_fits_calibrates_and_records_the_gate(tiny_model_dir, data_dir, tmp_path, capsys):
    """The whole build on a tiny random model: it cannot help XCOPA, so the gate keeps steering off."""
    out = tmp_path / "swh_Latn"
    assert main(["align", "build", "--model", str(tiny_model_dir("llama")), "--source", "sw",
                 "--data", f"sib200:dev@{data_dir}", "--max-pairs", "24", "--layers", "0-1",
                 "--calibrate", str(data_dir / "xcopa" / "val.sw.jsonl"), "--calibration-max-items", "40",
                 "--out", str(out)]) == 0
    manifest = load_intervention(out).manifest
    evidence = manifest.evidence
    assert evidence.task == "xcopa" and evidence.items == 40 and not evidence.adopted
    assert manifest.serving == ServingDefaults(alpha=0.0, layers=[0, 1], positions="last")
    assert manifest.format_version == FORMAT_VERSION
    # One language: 'auto' is the per-language design; what it could have detected is recorded and said.
    assert evidence.design == "current" and evidence.languages == ["swh_Latn"] and len(evidence.fold_choices) == 5
    assert 0 <= evidence.discordance <= 1
    floor = evidence.minimum_detectable_gain
    assert floor is None or floor > 3.6  # 40 items cannot show INCLINE's average gain
    assert re.fullmatch(r"off: no gain detectable; this calibration could only have detected gains above "
                        r"\d+\.\d points", evidence.decision)
    err = capsys.readouterr().err
    assert "gate not cleared" in err and evidence.decision in err and evidence.decision in evidence.summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swh_Latn"]  # no staging left behind


def test_a_two_language_build_is_decided_jointly_by_the_pooled_design(tiny_model_dir, data_dir, tmp_path, capsys):
    """Two languages found in the XCOPA directory, fitted and scored on one engine, decided together."""
    out = tmp_path / "interventions"
    assert main(["align", "build", "--model", str(tiny_model_dir("llama")), "--source", "sw,it",
                 "--data", f"sib200:dev@{data_dir}", "--max-pairs", "24", "--layers", "0-1",
                 "--calibrate", str(data_dir / "xcopa"), "--calibration-max-items", "40", "--gate-design", "pooled",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ita_Latn", "swh_Latn"]  # no staging left behind
    err = capsys.readouterr().err
    for code in ("swh_Latn", "ita_Latn"):
        manifest = load_intervention(out / code).manifest
        evidence = manifest.evidence
        assert manifest.source == code and evidence.file.endswith(f"val.{code[:2]}.jsonl") and evidence.items == 40
        assert evidence.design == "pooled" and evidence.languages == ["swh_Latn", "ita_Latn"]
        assert evidence.delta_ci95 is None and evidence.fold_choices == []  # no per-language CV interval
        assert (manifest.serving.alpha != 0) is evidence.adopted and evidence.decision in err
    # A shared design's power is the build's: one minimum and one discordance for both languages.
    recorded = {(load_intervention(out / code).evidence.minimum_detectable_gain,
                 load_intervention(out / code).evidence.discordance) for code in ("swh_Latn", "ita_Latn")}
    assert len(recorded) == 1


def test_interventions_list_says_the_design_and_the_detectable_gain(monkeypatch, capsys):
    from lingosteer.entrypoints import serve

    decision = "off: no gain detectable; this calibration could only have detected gains above 6.8 points"
    evidence = planted_evidence(design="pooled", decision=decision).model_dump(mode="json")
    row = {"language": "swh_Latn", "version": "v1", "serving": {"alpha": 0.0, "layers": [0, 1], "positions": "last"},
           "memory_bytes": 2**20, "path": "swh"}
    older = {**row, "language": "ita_Latn", "evidence": {**evidence, "design": None, "decision": None}}
    monkeypatch.setattr(serve, "_request", lambda *args, **kwargs: {"interventions": [{**row, "evidence": evidence},
                                                                                      older]})
    assert main(["interventions", "list", "--server", "http://127.0.0.1:9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].strip() == f"gate design pooled: {decision}"


def test_a_killed_build_leaves_nothing_behind(tiny_model_dir, data_dir, tmp_path):
    """A plain `kill` (SIGTERM) in the middle of `lingosteer align build` ends it through its finally
    blocks: exit status 143, the hidden staging directory removed, no artifact."""
    artifacts = tmp_path / "interventions"
    log = tmp_path / "build.log"
    command = [sys.executable, "-m", "lingosteer.entrypoints.main",
               "align", "build", "--model", str(tiny_model_dir("llama")),
               "--source", "sw", "--data", f"sib200:dev@{data_dir}", "--max-pairs", "24", "--layers", "0-1",
               "--calibrate", str(data_dir / "xcopa" / "val.sw.jsonl"), "--calibration-max-items", "40",
               "--out", str(artifacts / "swh_Latn")]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            # The staging directory exists from before the fit until the calibrated artifact is moved
            # into place; the poll only guards against a hang, it times nothing.
            deadline = time.monotonic() + 600
            while not (artifacts.is_dir() and any(artifacts.glob(".swh_Latn.build.*"))):
                assert process.poll() is None, f"the build ended before it could be killed:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no staging directory appeared"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=300) == 143, log.read_text()
        finally:
            process.kill()
    assert list(artifacts.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calibration-max-items", "10"], "swh_Latn has 10 calibration items, the minimum is 40; at 10 items "
                                             "a gain of +3.6 points would be adopted with probability at most 5%"),
        (["--gate-design", "pooled"], "design 'pooled' shares one configuration across languages and needs 2 or "
                                      "more; got 1 (swh_Latn): use 'current' for a single language"),
        (["--source", "sw,swh_Latn"], "--source must name distinct languages; repeated: swh_Latn"),
        (["--source", "ita_Latn"], "no xcopa calibration file for ita_Latn"),
        (["--calibrate", "/no/such/file.jsonl"], "calibration path(s) not found"),
    ],
)
def test_bad_build_input_is_refused_before_anything_slow(tiny_model_dir, data_dir, tmp_path, capsys, extra, message):
    args = {"--source": "sw", "--calibrate": str(data_dir / "xcopa" / "val.sw.jsonl")}
    for flag in ("--source", "--calibrate"):
        if flag in extra:
            args[flag] = extra[extra.index(flag) + 1]
    rest = [item for i, item in enumerate(extra) if item not in args and (i == 0 or extra[i - 1] not in args)]
    code = main(["align", "build", "--model", str(tiny_model_dir("llama")), "--data", f"sib200:dev@{data_dir}",
                 "--max-pairs", "10", "--out", str(tmp_path / "x"), *[v for kv in args.items() for v in kv], *rest])
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_compare_reports_each_intervention_at_its_best_layer(fitted, data_dir, tmp_path, capsys):
    model_dir, ridge = fitted
    shift, standardised = tmp_path / "shift", tmp_path / "standardised"
    for out, options in ((shift, ["--solver", "meanshift"]), (standardised, ["--standardise"])):
        assert main(["align", "fit", "--model", str(model_dir), "--source", "sw", "--data",
                     f"sib200:train@{data_dir}", "--max-pairs", "40", "--layers", "0-1", *options,
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["align", "compare", "--model", str(model_dir), "--interventions", str(ridge), str(shift),
                 str(standardised), "--data", f"sib200:test@{data_dir}", "--max-pairs", "30",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert [(row["solver"], row["standardise"]) for row in comparison["interventions"]] == [
        ("ridge", False), ("meanshift", False), ("ridge", True)]
    ridge_row, shift_row, _ = comparison["interventions"]
    assert shift_row["bytes"] < ridge_row["bytes"]  # a bias per layer against a full matrix
    for row in comparison["interventions"]:
        assert [r["layer"] for r in row["layers"]] == [0, 1] and row["num_pairs"] == 30
        assert all(r["p1_after_centred"] == r["p1_before_centred"] for r in row["layers"]) is (row is shift_row)
    assert "| meanshift |" in (tmp_path / "c" / "compare.md").read_text()
    assert "| ridge (standardised) |" in (tmp_path / "c" / "compare.md").read_text()
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_the_recommended_recipe_leaves_out_a_corpus_that_lacks_the_language(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "hat_Latn"  # Haitian Creole: in SIB-200, not in NTREX-128
    assert main(["align", "fit", "--model", str(tiny_model_dir("llama")), "--source", "ht", "--max-pairs", "12",
                 "--layers", "0", "--out", str(out)]) == 0
    assert "warning: ntrex:0-299 left out: no NTREX-128 file for language 'hat_Latn'" in capsys.readouterr().err
    assert [s["corpus"] for s in load_intervention(out).fit_data.sources] == ["sib200"]
