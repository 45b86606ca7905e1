"""The benchmark tasks, and from evaluation files to prompts: one `Example` (context, options, label) per item.

A task is a value, `Task`, registered by name in `TASKS` (as lm-evaluation-harness registers
a task's config): its loader, file formats, prompt words, how an item becomes an lm-eval
prompt, its number of choices and what INCLINE asks of it. Nothing else tests a task's name;
a name ("xcopa", "xnli") is looked up once, where it is read (the CLI, a report, a path).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lingosteer import config_path
from lingosteer.data import load_xcopa, load_xnli

PROMPT_STYLES = ("lm-eval", "mc")
FILE_NAME = re.compile(r"^(?P<split>[^.]+)\.(?P<lang>[A-Za-z]{2,3}(?:[_-][A-Za-z]{2,4})?)\.(?P<ext>jsonl|tsv)$")


@dataclass(frozen=True)
class Example:
    context: str
    options: tuple[str, ...]  # continuations of the context, each with its leading delimiter
    label: int  # index of the right option


@dataclass(frozen=True)
class InclineQuestion:
    """A task as INCLINE's code asks it (evaluation/incline.py): an English instruction prompt around
    the item's fields, and the answer the model should give for each label."""

    prompt: str
    answers: tuple[str, ...]  # indexed by the item's label


@dataclass(frozen=True)
class Task:
    """One benchmark: what the benchmark, its calibration and INCLINE need to know of it."""

    name: str  # as the CLI, reports, manifests and configs/bench spell it
    load: Callable[[Path], list]  # the items of one file (lingosteer.data; the format from the suffix)
    suffixes: tuple[str, ...]  # the file formats `load` reads
    words_key: str  # configs/bench/<name>.yaml: the per-language words of the lm-eval prompt
    lm_eval_example: Callable[[Any, Any], Example]  # (item, its language's words) -> lm-eval's prompt
    choices: int  # options per item
    incline: InclineQuestion

    @property
    def chance(self) -> float:
        """The accuracy of a guess."""
        return 1 / self.choices

    def named_in(self, path: str | Path) -> bool:
        """Whether a path names the task, as the shared data's folders do (data/xcopa/val.sw.jsonl)."""
        return self.name in str(path).lower()


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


XCOPA = Task(
    name="xcopa", load=load_xcopa, suffixes=(".jsonl",), words_key="connectors", lm_eval_example=_xcopa_example,
    choices=2,
    incline=InclineQuestion(
        'Here is a premise: "{premise}". A: "{choice1}" B: "{choice2}" What is the {question}? "A" or "B"?',
        ("A", "B")),
)
XNLI = Task(
    name="xnli", load=load_xnli, suffixes=(".tsv", ".jsonl"), words_key="words", lm_eval_example=_xnli_example,
    choices=3,
    # INCLINE's loader maps entailment -> true, neutral -> inconclusive, contradiction -> false;
    # our labels are 0 entailment, 1 neutral, 2 contradiction.
    incline=InclineQuestion(
        'Take the following as truth: {premise}\nThen the following statement: "{hypothesis}" is "true", '
        '"false", or "inconclusive"?', ("true", "inconclusive", "false")),
)
TASKS = {task.name: task for task in (XCOPA, XNLI)}


def get_task(name: str) -> Task:
    """The registered task of that name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def infer_task(paths: list[Path]) -> Task:
    """The one task the paths name (as the shared data names them)."""
    named = {task for task in TASKS.values() for path in paths if task.named_in(path)}
    if len(named) != 1:
        raise ValueError(f"cannot tell the task of {', '.join(map(str, paths))}: pass --task "
                         + " or --task ".join(TASKS))
    return named.pop()


def prompts_path(task: Task) -> Path:
    return config_path("bench", f"{task.name}.yaml")


def load_prompts(task: Task, path: str | Path | None = None) -> dict:
    """The prompt configuration of a task (default configs/bench/<task>.yaml)."""
    path = Path(path) if path is not None else prompts_path(task)
    if not path.is_file():
        raise FileNotFoundError(f"prompt configuration {path} not found")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    key = task.words_key
    if not isinstance(config, dict) or not isinstance(config.get(key), dict) or "mc" not in config:
        raise ValueError(f"{path}: expected a mapping with '{key}' (per language) and 'mc'")
    return config


def language_of(path: Path) -> str:
    """The language code in a file name `<split>.<lang>.<ext>`."""
    match = FILE_NAME.match(path.name)
    if not match:
        raise ValueError(f"{path}: cannot tell the language; name files <split>.<lang>.jsonl|tsv, e.g. test.sw.jsonl")
    return match["lang"]


def find_files(task: Task, paths: list[str | Path]) -> dict[str, Path]:
    """Language -> file, from files and directories (a directory contributes every
    `<split>.<lang>.<ext>` file of the task's formats). One file per language."""
    found: dict[str, Path] = {}
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.iterdir() if p.is_file() and FILE_NAME.match(p.name)
                           and p.suffix in task.suffixes)
            if not files:
                raise FileNotFoundError(f"{given} holds no <split>.<lang>.{'|'.join(task.suffixes)} files")
        elif given.is_file():
            if given.suffix not in task.suffixes:
                raise ValueError(f"{given}: {task.name} files must end in {' or '.join(task.suffixes)}")
            files = [given]
        else:
            raise FileNotFoundError(f"{given} does not exist")
        for path in files:
            lang = language_of(path)
            if lang in found and found[lang] != path:
                raise ValueError(f"two files for language {lang!r}: {found[lang]} and {path}; pass one per language")
            found[lang] = path
    return found


def load_items(task: Task, path: Path) -> list:
    items = task.load(path)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def build_examples(task: Task, lang: str, items: list, prompts: dict, style: str = "lm-eval") -> list[Example]:
    """The prompts of one language's items."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "mc":
        return [_mc_example(item, prompts["mc"]) for item in items]
    words = _per_language(prompts, task.words_key, lang)
    return [task.lm_eval_example(item, words) for item in items]


def _mc_example(item, mc: dict) -> Example:
    fields = vars(item)
    return Example(mc["template"].format(**fields), tuple(mc["letters"]), item.label)


def _per_language(prompts: dict, key: str, lang: str):
    table = prompts[key]
    if lang not in table:
        raise ValueError(
            f"no prompt words for language {lang!r} ({key} in configs/bench); known: {', '.join(sorted(table))}"
        )
    return table[lang]
