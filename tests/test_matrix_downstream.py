"""`sweep downstream`: partners from a planted matrix, the classifier on a planted signal, and the command
end to end through real Ray on tiny data (trains 5 runs once; a rerun reuses them)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matrix.artifact import InterferenceMatrix, save_interference
from matrix.downstream import (
    DEFAULT_TRAINING, accuracy_with_ci, choose_partners, plan_targets, run_downstream, topic_correctness,
)
from matrix.sweep import load_encoder

LANGUAGES = ("eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "ita_Latn")
# Each topic has its own words, so even a barely trained encoder's mean-pooled embeddings separate the topics.
TOPIC_WORDS = {
    "science/technology": "atom laser robot quantum electron",
    "travel": "airport hotel passport luggage beach",
    "politics": "election senate minister vote parliament",
    "sports": "football goal stadium coach tennis",
    "health": "doctor hospital vaccine fever medicine",
    "entertainment": "movie actor concert music theater",
    "geography": "mountain river ocean desert island",
}


def _planted_matrix(languages=LANGUAGES) -> InterferenceMatrix:
    """Row eng_Latn: ita and spa barely hurt it (I -0.01, -0.02), deu and fra hurt it most (-0.20, -0.10)."""
    loss = np.full((len(languages), len(languages)), 5.0)
    loss[0, 1:] = [5.5, 6.0, 5.1, 5.05]  # fra, deu, spa, ita
    return InterferenceMatrix.from_loss(languages, loss)


def test_partners_are_the_lowest_and_highest_interference_of_the_target_row():
    plan = choose_partners(_planted_matrix(), "eng_Latn")
    assert plan.low == ("ita_Latn", "spa_Latn") and plan.high == ("deu_Latn", "fra_Latn")
    assert plan.runs == [("eng_Latn",), ("eng_Latn", "ita_Latn"), ("eng_Latn", "spa_Latn"),
                         ("deu_Latn", "eng_Latn"), ("eng_Latn", "fra_Latn")]
    one = choose_partners(_planted_matrix(), "eng_Latn", per_side=1)
    assert one.low == ("ita_Latn",) and one.high == ("deu_Latn",)
    loss = _planted_matrix().loss.copy()
    loss[0, 4] = np.nan  # ita unmeasured: 3 partners left, too few for 2 per side
    with pytest.raises(ValueError, match="3 measured partners"):
        choose_partners(InterferenceMatrix.from_loss(LANGUAGES, loss), "eng_Latn")
    # A completed entry (a partial sweep's prediction) is no partner either, however it ranks.
    completed = InterferenceMatrix.from_loss(LANGUAGES, loss).completed(np.full((5, 5), -0.001), {"method": "test"})
    with pytest.raises(ValueError, match="3 measured partners"):
        choose_partners(completed, "eng_Latn")
    with pytest.raises(ValueError, match="not in the interference matrix"):
        choose_partners(_planted_matrix(), "hau_Latn")


def test_targets_must_be_known_and_in_sib200_and_the_matrix_must_exist(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="interference file .* not found"):
        run_downstream(tmp_path / "nope.json", ["eng_Latn"], DEFAULT_TRAINING, tmp_path / "r", tmp_path / "o")
    matrix = _planted_matrix()
    assert [p.target for p in plan_targets(matrix, ["en"], data_dir=data_dir)] == ["eng_Latn"]  # code normalised
    with pytest.raises(ValueError, match="unknown language"):
        plan_targets(matrix, ["xx_Nope"], data_dir=data_dir)
    (tmp_path / "sib200" / "eng_Latn").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="SIB-200 train split"):
        plan_targets(matrix, ["eng_Latn"], data_dir=tmp_path)


def test_classifier_recovers_a_planted_separable_signal():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(7, 16))
    labels = [f"topic{i}" for i in range(7)]

    def sample(per_topic):
        y = [label for label in labels for _ in range(per_topic)]
        x = np.concatenate([centres[i] + rng.normal(size=(per_topic, 16)) for i in range(7)])
        return x, y

    (train_x, train_y), (test_x, test_y) = sample(40), sample(20)
    separable = accuracy_with_ci(topic_correctness(train_x, train_y, test_x, test_y))
    assert separable["accuracy"] > 0.95 and separable["ci"][0] > 0.9
    shuffled = list(rng.permutation(train_y))  # the same features, labels unrelated to them
    chance = accuracy_with_ci(topic_correctness(train_x, shuffled, test_x, test_y))
    assert chance["accuracy"] < 0.4 and chance["ci"][0] <= chance["accuracy"] <= chance["ci"][1]
    with pytest.raises(ValueError, match="needs 2 or more"):
        topic_correctness(train_x, ["one"] * len(train_y), test_x, test_y)


def _write_sib(folder: Path, split: str, rows: int, rng) -> None:
    lines = ["index_id\tcategory\ttext"]
    for index in range(rows):
        topic = list(TOPIC_WORDS)[index % len(TOPIC_WORDS)]
        words = rng.choice(TOPIC_WORDS[topic].split(), size=6).tolist() + ["the", "news", "today"]
        lines.append(f"{index}\t{topic}\t{' '.join(rng.permutation(words))}")
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def _tiny_data(root: Path) -> Path:
    rng = np.random.default_rng(1)
    ntrex = root / "ntrex128"
    ntrex.mkdir(parents=True)
    news = [" ".join(rng.choice("the report said many people met on monday".split(), size=7)) for _ in range(20)]
    (ntrex / "newstest2019-src.eng.txt").write_text("\n".join(news) + "\n")
    for language in LANGUAGES:
        folder = root / "sib200" / language
        folder.mkdir(parents=True)
        for split, rows in (("train", 70), ("dev", 7), ("test", 28)):
            _write_sib(folder, split, rows, rng)
        (ntrex / f"newstest2019-ref.{language}.txt").write_text("\n".join(news) + "\n")
    return root


def _lingosteer(*args):
    command = [sys.executable, "-m", "lingosteer.entrypoints.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_downstream_trains_once_reports_and_reuses_its_encoders(tmp_path):
    data = _tiny_data(tmp_path / "data")
    matrix = save_interference(_planted_matrix(), tmp_path / "interference.json")
    training = tmp_path / "tiny.yaml"
    training.write_text(  # the CPU recipe, shrunk
        "hidden_size: 32\nnum_layers: 1\nnum_heads: 2\nintermediate_size: 32\nmax_length: 16\n"
        "learning_rate: 2.0e-3\nsteps: 4\nwarmup_steps: 1\nbatch_size: 8\nsentences_per_language: null\n"
        "vocab_limit: 256\n"
    )
    results, out = tmp_path / "results", tmp_path / "report"
    command = ["sweep", "downstream", "--matrix", matrix, "--targets", "eng_Latn", "--training", training,
               "--results", results, "--out", out, "--data", data]
    done = _lingosteer(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 runs trained now, 0 reused" in done.stdout
    runs = {"eng_Latn", "eng_Latn+ita_Latn", "eng_Latn+spa_Latn", "deu_Latn+eng_Latn", "eng_Latn+fra_Latn"}
    records = {p.stem: p.read_text() for p in (results / "runs").glob("*.json")}
    assert set(records) == runs  # the target's mono and its 4 pairs, not the partners' mono runs
    encoders = {p.stem: p.read_bytes() for p in (results / "encoders").glob("*.safetensors")}
    assert set(encoders) == runs and not list(results.rglob("*.pt")) and not list(results.rglob("*.pkl"))

    report = json.loads((out / "downstream.json").read_text())
    assert report["plans"] == [{"target": "eng_Latn", "low": ["ita_Latn", "spa_Latn"],
                                "high": ["deu_Latn", "fra_Latn"]}]
    table = report["summary"]["targets"][0]
    assert table["test_items"] == 28 and table["majority_class_rate"] == pytest.approx(4 / 28)
    assert table["mono"]["accuracy"] > 0.5  # the planted topic words are recovered
    assert [row["partner"] for row in table["low"] + table["high"]] == ["ita_Latn", "spa_Latn", "deu_Latn", "fra_Latn"]
    assert table["low_avg"] == pytest.approx(np.mean([row["accuracy"] for row in table["low"]]))
    correlation = report["summary"]["correlation"]
    # rho is null (NaN) when all 4 drops tie, as they may after 4 training steps.
    assert correlation["pairs"] == 4 and (correlation["rho"] is None or -1 <= correlation["rho"] <= 1)
    assert report["summary"]["finding"] in ("replicated", "not replicated", "inconclusive at this scale")
    assert report["matrix_reproduction"]["losses_compared"] == 9  # 1 mono + 4 pairs x 2 languages
    summary = (out / "summary.md").read_text()
    assert "ita_Latn (I -0.010)" in summary and report["summary"]["finding"] in summary
    assert (out / "downstream.png").stat().st_size > 0

    again = _lingosteer(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 runs trained now, 5 reused" in again.stdout
    assert {p.stem: p.read_text() for p in (results / "runs").glob("*.json")} == records
    assert {p.stem: p.read_bytes() for p in (results / "encoders").glob("*.safetensors")} == encoders
    assert json.loads((out / "downstream.json").read_text()) == report  # evaluation is deterministic

    model, vocabulary = load_encoder(results, "eng_Latn")
    assert len(vocabulary) == model.token_embedding.num_embeddings and not model.training
    (results / "encoders" / "eng_Latn.safetensors").write_bytes(encoders["eng_Latn"][:-1] + b"x")
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_encoder(results, "eng_Latn")
