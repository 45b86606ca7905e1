"""lm-evaluation-harness's own XCOPA and XNLI tasks, their items read from local files.

The Hugging Face Hub, where lm-eval's task files fetch their data, is out of reach here. For every
language with a file under the data directory (`xcopa/val.<iso>.jsonl`, `xnli/dev.<iso>.tsv`),
`write_local_tasks` writes one task file that `include`s lm-eval's own task file of that language
(its prompt, choices, target and metric, unchanged) and overrides only where the items come from:
lm-eval's `custom_dataset` hook, `local_dataset`, reads the file with the loader `lingosteer bench`
reads it with (`evaluation.tasks`), so both score the same items, validated alike (XNLI's label
words become lm-eval's 0 / 1 / 2 there). The file holds one split, scored as lm-eval's validation
split: XCOPA's test split, which lm-eval scores when a dataset has one, is not among the local files.

The tasks keep lm-eval's names (`xcopa_sw`): lm-eval 0.4 lets a task found under `--include_path`
replace the built-in one of the same name (it logs a warning saying so), and the `lingosteer` model
reads a task's language from the name's last part. The written files name the data by absolute path
and import `local_dataset` from this package, so they work wherever lingosteer is installed beside
lm-eval (`lingosteer lm-eval-tasks` writes them; `lingosteer lm-eval --local-data DIR` writes them
for one run).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

from evaluation.tasks import find_files, get_task, load_items

# Benchmark (`evaluation.tasks.TASKS`) -> lm-eval's task file of one language, under lm_eval/tasks/.
# Its task is named <benchmark>_<iso>, as the local files' languages are.
LMEVAL_TASK_FILES = {"xcopa": "xcopa/default_{lang}.yaml", "xnli": "xnli/xnli_{lang}.yaml"}
TASK_FILE = """\
# lm-eval's own {name}, its items from a local file (evaluation/lmeval_tasks.py)
include: {include}
task: {name}
dataset_path: {data_file}
dataset_name: null
custom_dataset: !function evaluation.lmeval_tasks.local_dataset
dataset_kwargs:
  benchmark: {benchmark}
  data_file: {data_file}
training_split: null
validation_split: validation
test_split: null
"""


def lmeval_tasks_dir() -> Path:
    """lm-eval's task folder, found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError('lm-eval is not installed: pip install "lm_eval[api]"')
    return Path(spec.submodule_search_locations[0]) / "tasks"


def write_local_tasks(data_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write a task file into `out_dir` for each lm-eval XCOPA / XNLI language with a file under
    `data_dir` (its `xcopa/` and `xnli/` folders); returns the task names, sorted."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    tasks_dir = lmeval_tasks_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for benchmark, pattern in LMEVAL_TASK_FILES.items():
        folder = data_dir / benchmark
        if not folder.is_dir():
            continue
        for lang, path in find_files(get_task(benchmark), [folder]).items():
            include = tasks_dir / pattern.format(lang=lang)
            if not include.is_file():
                continue  # a language lm-eval has no task for (XCOPA's English training file)
            name = f"{benchmark}_{lang}"
            # JSON strings are YAML's double-quoted scalars: any path stays one value.
            (out_dir / f"{name}.yaml").write_text(TASK_FILE.format(
                name=name, include=json.dumps(str(include)), benchmark=benchmark, data_file=json.dumps(str(path))),
                encoding="utf-8")
            names.append(name)
    if not names:
        raise FileNotFoundError(f"no XCOPA (xcopa/val.<iso>.jsonl) or XNLI (xnli/dev.<iso>.tsv) files of a language "
                                f"lm-eval defines under {data_dir}")
    return sorted(names)


def local_dataset(benchmark: str, data_file: str, **_metadata):
    """lm-eval's `custom_dataset` hook: a local file's items as `lingosteer bench` reads them, as the
    validation split, with the fields lm-eval's task reads. lm-eval also passes the task's metadata
    (and the model_args) as keyword arguments; they do not choose the items."""
    import datasets  # local: lm-eval's dependency, loaded only where lm-eval runs

    items = load_items(get_task(benchmark), Path(data_file))
    return datasets.DatasetDict(validation=datasets.Dataset.from_list([asdict(item) for item in items]))
