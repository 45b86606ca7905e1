"""From evaluation files to prompts: one `Example` (context, options, label) per item.

Files are named `<split>.<lang>.<ext>` (`val.sw.jsonl`, `dev.sw.tsv`, `test.sw.jsonl`);
the language comes from the name. Prompt wording lives in configs/bench/<task>.yaml:

- style "lm-eval" reproduces lm-evaluation-harness. XCOPA: the premise without its
  final period + " " + the connector word for cause/effect, options " " + the choice
  with a lowercased first letter. XNLI: "{premise}, {question_word}?", options
  " {yes|also|no word}, {hypothesis}".
- style "mc" is an INCLINE-style multiple-choice prompt whose options are the
  answer letters (" A", " B", ...).

Each option starts with its own delimiter (a space), as lm-eval's continuations do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lingosteer import config_path
from lingosteer.data import load_xcopa, load_xnli

TASKS = ("xcopa", "xnli")
PROMPT_STYLES = ("lm-eval", "mc")
# Which file suffixes each task reads (lingosteer.data loaders pick the format by suffix).
TASK_SUFFIXES = {"xcopa": (".jsonl",), "xnli": (".tsv", ".jsonl")}
FILE_NAME = re.compile(r"^(?P<split>[^.]+)\.(?P<lang>[A-Za-z]{2,3}(?:[_-][A-Za-z]{2,4})?)\.(?P<ext>jsonl|tsv)$")


@dataclass(frozen=True)
class Example:
    context: str
    options: tuple[str, ...]  # continuations of the context, each with its leading delimiter
    label: int  # index of the right option


def prompts_path(task: str) -> Path:
    return config_path("bench", f"{task}.yaml")


def load_prompts(task: str, path: str | Path | None = None) -> dict:
    """The prompt configuration of a task (default configs/bench/<task>.yaml)."""
    _check_task(task)
    path = Path(path) if path is not None else prompts_path(task)
    if not path.is_file():
        raise FileNotFoundError(f"prompt configuration {path} not found")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    key = "connectors" if task == "xcopa" else "words"
    if not isinstance(config, dict) or not isinstance(config.get(key), dict) or "mc" not in config:
        raise ValueError(f"{path}: expected a mapping with '{key}' (per language) and 'mc'")
    return config


def language_of(path: Path) -> str:
    """The language code in a file name `<split>.<lang>.<ext>`."""
    match = FILE_NAME.match(path.name)
    if not match:
        raise ValueError(f"{path}: cannot tell the language; name files <split>.<lang>.jsonl|tsv, e.g. test.sw.jsonl")
    return match["lang"]


def find_files(task: str, paths: list[str | Path]) -> dict[str, Path]:
    """Language -> file, from files and directories (a directory contributes every
    `<split>.<lang>.<ext>` file of the task's formats). One file per language."""
    _check_task(task)
    found: dict[str, Path] = {}
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.iterdir() if p.is_file() and FILE_NAME.match(p.name)
                           and p.suffix in TASK_SUFFIXES[task])
            if not files:
                raise FileNotFoundError(f"{given} holds no <split>.<lang>.{'|'.join(TASK_SUFFIXES[task])} files")
        elif given.is_file():
            if given.suffix not in TASK_SUFFIXES[task]:
                raise ValueError(f"{given}: {task} files must end in {' or '.join(TASK_SUFFIXES[task])}")
            files = [given]
        else:
            raise FileNotFoundError(f"{given} does not exist")
        for path in files:
            lang = language_of(path)
            if lang in found and found[lang] != path:
                raise ValueError(f"two files for language {lang!r}: {found[lang]} and {path}; pass one per language")
            found[lang] = path
    return found


def load_items(task: str, path: Path) -> list:

    _check_task(task)
    items = load_xcopa(path) if task == "xcopa" else load_xnli(path)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def build_examples(task: str, lang: str, items: list, prompts: dict, style: str = "lm-eval") -> list[Example]:
    """The prompts of one language's items."""
    _check_task(task)
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "mc":
        return [_mc_example(task, item, prompts["mc"]) for item in items]
    if task == "xcopa":
        connectors = _per_language(prompts, "connectors", lang)
        return [_xcopa_example(item, connectors) for item in items]
    words = _per_language(prompts, "words", lang)
    return [_xnli_example(item, words) for item in items]


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _xcopa_example(item, connectors: dict) -> Example:
    # lm-eval drops the premise's final character (its period) before the connector.
    context = item.premise.strip()[:-1] + " " + connectors[item.question]
    options = (" " + _lowercase_first(item.choice1), " " + _lowercase_first(item.choice2))
    return Example(context, options, item.label)


def _xnli_example(item, words: list) -> Example:
    question, *answers = words
    context = f"{item.premise}, {question}?"
    return Example(context, tuple(f" {answer}, {item.hypothesis}" for answer in answers), item.label)


def _mc_example(task: str, item, mc: dict) -> Example:
    fields = vars(item)
    return Example(mc["template"].format(**fields), tuple(mc["letters"]), item.label)


def _per_language(prompts: dict, key: str, lang: str):
    table = prompts[key]
    if lang not in table:
        raise ValueError(
            f"no prompt words for language {lang!r} ({key} in configs/bench); known: {', '.join(sorted(table))}"
        )
    return table[lang]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
