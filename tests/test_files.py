"""The shared file helpers: atomic writes, content hashes, markdown tables, figures, the score store."""

import hashlib

import numpy as np
import pytest

from lingosteer.files import atomic_path, sha256_files, write_text_atomic
from lingosteer.markdown import markdown_table


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_text_atomic(path, "new ü\n")
    assert path.read_text(encoding="utf-8") == "new ü\n" and len(list(tmp_path.iterdir())) == 1


def test_the_suffix_lets_writers_that_add_one_write_the_temporary_itself(tmp_path):
    with atomic_path(tmp_path / "table.npy", suffix=".npy") as tmp:
        np.save(tmp, np.arange(3))  # would write tmp + ".npy" if the name did not end so
    np.testing.assert_array_equal(np.load(tmp_path / "table.npy"), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["table.npy"]


def test_sha256_of_files_is_that_of_their_contents_one_after_another(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * (3 << 20))
    (tmp_path / "b").write_bytes(b"yz")
    assert sha256_files(tmp_path / "a") == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert sha256_files(tmp_path / "a", tmp_path / "b") == hashlib.sha256(b"x" * (3 << 20) + b"yz").hexdigest()


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, ""]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 |  |"
    assert markdown_table(["n"], [[3]], right_aligned=True) == "| n |\n|---:|\n| 3 |"


def test_a_saved_figure_is_a_whole_png_and_closed_and_a_failed_one_leaves_nothing(tmp_path):
    from lingosteer.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    broken, _ = plt.subplots()
    with pytest.raises(ValueError):
        save_figure(broken, tmp_path / "broken.png", dpi=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"] and not plt.fignum_exists(broken.number)


def test_score_store_resumes_under_its_key_and_sets_another_key_aside(tmp_path):
    from evaluation.score_store import ScoreStore

    key = {"model": "m", "grid": (-1.0, 0.0, 1.0)}  # a tuple: index.json reads it back as a list
    store = ScoreStore(tmp_path / "scores", key)
    table = store.load("sw:plain", (2, 3))
    assert np.isnan(table).all()
    table[0] = [1.0, 2.0, 3.0]
    store.save("sw:plain", table)
    np.testing.assert_array_equal(ScoreStore(tmp_path / "scores", key).load("sw:plain", (2, 3)), table)
    other = ScoreStore(tmp_path / "scores", {**key, "model": "another"})
    assert np.isnan(other.load("sw:plain", (2, 3))).all()  # never mixed in
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("scores.stale-")]  # set aside, not deleted
