"""The steering op is graph safe: one trace of a steered decoder replays correctly whatever a step steers.

bench/graph_safety.py's proof at a smaller size (it reports 50 steps per bank); its tensor-parallel
and architecture parts are tested in test_tensor_parallel.py and test_architectures.py.
"""

import pytest

from lingosteer import REPO_ROOT


@pytest.fixture
def graph_safety(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # imported as the script imports its siblings
    import graph_safety

    return graph_safety


@pytest.mark.parametrize("max_map_rank", [None, 8])
def test_one_trace_replays_changing_steps_equal_to_the_hf_reference(graph_safety, tiny_model_dir, tmp_path,
                                                                     max_map_rank):
    result = graph_safety.replay_check(tiny_model_dir(graph_safety.ARCH), tmp_path, max_map_rank, steps=12, seed=3)
    assert result["traces"] == 1 and result["recompilations"] == 0
    assert result["static_shapes"] and result["data_dependent_ops"] == []
    assert result["steered_rows"] > 0 and result["max_abs_diff_hf"] <= result["tolerance"]


def test_an_op_that_finds_its_rows_by_reading_the_buffer_is_caught(graph_safety, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """The check can fail: gathering only the steered rows makes shapes depend on the data, which a captured
    graph cannot replay (and which the steering op therefore never does)."""
    steer_rows = graph_safety.steer_rows

    def gathered(hidden, residual, slot, alpha, *bank, **kwargs):
        rows = slot.nonzero().squeeze(1)  # how many rows: known only by reading the buffer
        part_hidden, part_residual = hidden[rows], residual[rows]
        steer_rows(part_hidden, part_residual, slot[rows], alpha[rows], *bank, **kwargs)
        hidden.index_copy_(0, rows, part_hidden)
        residual.index_copy_(0, rows, part_residual)

    monkeypatch.setattr(graph_safety, "steer_rows", gathered)
    result = graph_safety.replay_check(tiny_model_dir(graph_safety.ARCH), tmp_path, None, steps=3, seed=0)
    assert "aten.nonzero.default" in result["data_dependent_ops"] and not result["static_shapes"]


def test_the_script_prints_one_object_with_the_proofs_keys(graph_safety, data_dir, capsys):
    """Its engine parts (tensor parallel, architectures) are skipped here: their own tests start those engines."""
    import json

    assert graph_safety.main(["--json", "--steps", "3", "--data", str(data_dir),
                              "--skip", "tensor_parallel,architectures"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"steps", "traces", "recompilations", "max_abs_diff_hf", "full_bank", "lowrank_bank"} <= set(result)
    assert result["steps"] == 3 and result["traces"] == 1 and result["passed"]
