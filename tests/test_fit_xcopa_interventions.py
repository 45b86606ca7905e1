"""bench/fit_xcopa_interventions.py on the tiny Llama: one map per fold, never fitted on its own fold."""

import importlib.util

import numpy as np

from alignment.artifact import TaskItems, load_intervention
from lingosteer import REPO_ROOT


def _fit_script():
    path = REPO_ROOT / "bench" / "fit_xcopa_interventions.py"
    spec = importlib.util.spec_from_file_location("fit_xcopa_interventions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_fold_map_leaves_out_its_fold(model_dir, data_dir, tmp_path):
    out = tmp_path / "maps"
    args = ["--model", str(model_dir), "--langs", "sw,qu", "--sib-pairs", "20", "--ntrex-pairs", "10",
            "--xcopa-items", "10", "--xcopa-folds", "2", "--data-dir", str(data_dir), "--out", str(out)]
    assert _fit_script().main(args) == 0

    maps = [load_intervention(out / f"fold{k}" / "swh_Latn") for k in range(2)]
    assert [m.fit_data.task_items for m in maps] == [
        TaskItems(file="val.sw.jsonl", ranges=[[5, 10]]), TaskItems(file="val.sw.jsonl", ranges=[[0, 5]])]
    # 20 SIB-200 + 10 NTREX pairs shared, plus 3 sentences of each of the 5 items kept
    assert [m.fit_data.sources[-1]["pairs"] for m in maps] == [15, 15]
    assert [m.fit_data.num_pairs for m in maps] == [45, 45]
    assert not np.allclose(maps[0].delta(0)[0], maps[1].delta(0)[0])

    # Quechua has neither NTREX nor translated XCOPA items: SIB-200 only, no task items, same map in both folds
    quechua = [load_intervention(out / f"fold{k}" / "quy_Latn") for k in range(2)]
    assert all(m.fit_data.task_items is None and len(m.fit_data.sources) == 1 for m in quechua)
