"""The sweep through real Ray, end to end: two languages on a tiny config (3 runs), analysis,
a rerun that skips finished runs, and recovery from a killed worker and a killed driver; a tiny
partial design (8 of 15 runs) analysed with the rest completed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from lingosteer import config_path
from matrix.artifact import load_interference

RUNS = {"eng_Latn", "swh_Latn", "eng_Latn+swh_Latn"}


def _sweep_config(tmp_path: Path, data_dir: Path, steps: int) -> Path:
    path = tmp_path / f"tiny-{steps}.yaml"
    path.write_text(
        "languages: [eng_Latn, swh_Latn]\n"
        f"training: {config_path('training', 'cpu.yaml')}\n"
        f"training_overrides: {{steps: {steps}, warmup_steps: 2, hidden_size: 16, num_heads: 2, "
        "intermediate_size: 32, max_length: 24, vocab_limit: 512}\n"
        f"data_dir: {data_dir}\n"
        "seed: 0\n"
    )
    return path


def _lingosteer(*args, **kwargs):
    command = [sys.executable, "-m", "lingosteer.entrypoints.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}


def test_two_language_sweep_end_to_end(tmp_path, data_dir):
    config, results, out = _sweep_config(tmp_path, data_dir, steps=15), tmp_path / "results", tmp_path / "analysis"
    done = _lingosteer("sweep", "run", "--config", config, "--results", results, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(results)
    assert set(records) == RUNS
    pair = records["eng_Latn+swh_Latn"]
    assert set(pair["loss"]) == {"eng_Latn", "swh_Latn"}
    assert pair["training_sentences"] == {"eng_Latn": 1398, "swh_Latn": 1398}
    assert records["eng_Latn"]["training_sentences"] == {"eng_Latn": 2797}
    assert records["eng_Latn"]["peak_rss_mib"] > 50 and 0 < records["eng_Latn"]["cpu_seconds"]

    analysed = _lingosteer("sweep", "analyse", results, "--out", out, timeout=300)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    matrix = load_interference(out / "interference.json")
    assert matrix.languages == ("eng_Latn", "swh_Latn")
    mono = records["eng_Latn"]["loss"]["eng_Latn"]
    assert matrix.loss[0, 0] == mono and matrix.loss[0, 1] == pair["loss"]["eng_Latn"]
    assert matrix.interference[0, 1] == pytest.approx((mono - pair["loss"]["eng_Latn"]) / mono)
    for name in ("loss.csv", "interference.csv", "summary.md", "interference_heatmap.png",
                 "robustness_friendliness.png"):
        assert (out / name).stat().st_size > 0

    again = _lingosteer("sweep", "run", "--config", config, "--results", results, timeout=300)
    assert again.returncode == 0 and "0 runs done now, 3 of 3 already done" in again.stdout
    assert _records(results) == records  # nothing rerun or rewritten

    other = _sweep_config(tmp_path, data_dir, steps=16)
    clash = _lingosteer("sweep", "run", "--config", other, "--results", results, timeout=300)
    assert clash.returncode == 2 and "different sweep configuration" in clash.stderr


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _training_workers(driver: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in driver.children(recursive=True):
        try:
            if child.name().startswith("ray::_train_task") or " ".join(child.cmdline()).startswith("ray::_train_task"):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_killed_worker_and_killed_driver_lose_and_duplicate_nothing(tmp_path, data_dir):
    config, results = _sweep_config(tmp_path, data_dir, steps=400), tmp_path / "results"
    command = [sys.executable, "-m", "lingosteer.entrypoints.main", "sweep", "run", "--config", str(config),
               "--results", str(results)]

    # 1. Kill the driver (SIGKILL, no cleanup) as soon as the first record is written.
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(first.pid)
    try:
        _wait_for(lambda: _records(results), 600, "the first record")
        descendants = driver.children(recursive=True)
        first.kill()
    finally:
        first.wait()
        for process in driver.children(recursive=True) if driver.is_running() else []:
            process.kill()
    for process in descendants:  # the Ray processes it had started
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    survivors = _records(results)
    assert 1 <= len(survivors) < 3 and set(survivors) <= RUNS

    # 2. Resume; kill one training worker mid-run: Ray retries that run.
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for(lambda: _training_workers(psutil.Process(second.pid)), 600, "a training worker")[0]
        os.kill(victim.pid, signal.SIGKILL)
        output, _ = second.communicate(timeout=600)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, output[-3000:]
    records = _records(results)
    assert set(records) == RUNS  # nothing lost
    for name, record in records.items():  # nothing duplicated or half-written
        assert record["run_id"] == name
    assert not list((results / "runs").glob(".*.tmp"))
    # The killed worker was running its task: it wrote no record, another process redid its run.
    assert victim.pid not in {record["pid"] for record in records.values()}
    for name in survivors:  # finished runs were not redone
        assert records[name] == survivors[name]
    log = [json.loads(line) for line in (results / "invocations.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["completed"] == 3 - len(survivors) and log[0]["failed"] == 0


def test_partial_design_sweep_completes_the_rest(tmp_path, data_dir):
    """Five languages at one partner each: 5 monolingual + 3 pair runs (of 15), the other 7 pairs completed."""
    languages = ["eng_Latn", "fra_Latn", "hin_Deva", "rus_Cyrl", "swh_Latn"]
    full = tmp_path / "full.yaml"
    full.write_text(_sweep_config(tmp_path, data_dir, steps=15).read_text().replace(
        "languages: [eng_Latn, swh_Latn]", f"languages: [{', '.join(languages)}]"))
    partial = tmp_path / "partial.yaml"
    partial.write_text(full.read_text() + "design: {partners_per_language: 1}\n")
    results, out = tmp_path / "results", tmp_path / "analysis"
    planned = _lingosteer("sweep", "plan", "--config", partial, timeout=120)
    pairs = {"eng_Latn+fra_Latn", "eng_Latn+swh_Latn", "hin_Deva+rus_Cyrl"}  # matrix/design.py's rule
    assert planned.returncode == 0 and set(planned.stdout.split("\n\n")[0].split()) == set(languages) | pairs
    assert "| k = 1 | 8 |" in planned.stdout and "| full | 15 |" in planned.stdout

    done = _lingosteer("sweep", "run", "--config", partial, "--results", results, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(results)
    assert set(records) == set(languages) | pairs
    assert json.loads((results / "sweep.json").read_text())["identity"]["design"] == {"partners_per_language": 1}
    clash = _lingosteer("sweep", "run", "--config", full, "--results", results, timeout=300)
    assert clash.returncode == 2 and "different sweep configuration" in clash.stderr  # another design: refused

    analysed = _lingosteer("sweep", "analyse", results, "--out", out, timeout=300)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    matrix = load_interference(out / "interference.json")
    index = {code: i for i, code in enumerate(matrix.languages)}
    for name, record in records.items():  # measured entries are the records' losses
        for evaluated in record["languages"]:
            added = next((c for c in record["languages"] if c != evaluated), evaluated)
            assert matrix.measured[index[evaluated], index[added]]
            assert matrix.loss[index[evaluated], index[added]] == record["loss"][evaluated]
    assert int(matrix.measured.sum()) == 5 + 2 * 3
    completed = ~matrix.measured
    assert np.isnan(matrix.loss[completed]).all() and not np.isnan(matrix.interference[completed]).any()
    assert matrix.completion["expected_abs_error"] > 0 and matrix.metadata["runs"] == {"measured": 8, "planned": 8}
    assert "6 of 20 off-diagonal entries measured" in (out / "summary.md").read_text()
