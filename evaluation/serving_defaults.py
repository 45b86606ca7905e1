"""Calibrated serving defaults for one artifact: score the candidates, apply the gate, record the evidence.

`lingosteer align build` calls `calibrate_serving` after the fit. Every candidate of
`evaluation.calibration.search_space` and the plain run score the calibration items
of the artifact's language through the same vLLM engine and plugin that serve
requests; `choose_serving` applies the pre-declared rule (`GATE_RULE`); the result
goes into the manifest as `serving` + `evidence` (`alignment.artifact.set_serving_defaults`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alignment.artifact import load_intervention, set_serving_defaults
from evaluation.calibration import GATE_RULE, MIN_CALIBRATION_ITEMS, STEER_OF_POSITIONS, choose_serving, search_space
from evaluation.runner import (
    BenchmarkConfig,
    Scorer,
    Timing,
    correct_choices,
    engine_facts,
    load_language_sets,
    start_scoring_engine,
)
from evaluation.scoring import PLAIN, Condition
from evaluation.tasks import load_prompts
from lingosteer.backend import shutdown_engine
from lingosteer.models import resolve_model


def infer_task(paths: list[Path]) -> str:
    """xcopa or xnli from the calibration paths' names (as the shared data names them)."""
    named = {task for task in ("xcopa", "xnli") for path in paths if task in str(path).lower()}
    if len(named) != 1:
        raise ValueError(f"cannot tell the task of {', '.join(map(str, paths))}: pass --task xcopa or --task xnli")
    return named.pop()


def load_calibration_items(model: str, calibrate_paths: list[Path], language: str, task: str | None = None,
                           max_items: int | None = None):
    """The calibration items of `language` (a `LanguageSet`), checked before anything slow runs."""
    from transformers import AutoTokenizer


    task = task or infer_task(calibrate_paths)
    config = BenchmarkConfig(task=task, model=model, eval_paths=list(calibrate_paths), max_items=max_items)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    sets = {s.flores: s for s in load_language_sets(config, calibrate_paths, tokenizer, load_prompts(task)).values()}
    if language not in sets:
        found = ", ".join(sorted(sets)) or "none"
        raise ValueError(f"no {task} calibration file for {language} in {', '.join(map(str, calibrate_paths))} "
                         f"(languages found: {found})")
    items = sets[language]
    if items.n < MIN_CALIBRATION_ITEMS:
        raise ValueError(f"{items.path}: {items.n} calibration items are too few for the gate "
                         f"(at least {MIN_CALIBRATION_ITEMS})")
    return task, items


def calibrate_serving(artifact_dir: Path, model: str, task: str, items, dtype: str = "float32",
                      progress: bool = True, llm=None) -> dict:
    """Choose and record `artifact_dir`'s serving defaults on `items`; returns the evidence written.
    Starts a scoring engine unless given one (`llm`, as `evaluation.runner.start_scoring_engine` makes)."""

    artifact = load_intervention(artifact_dir)
    if artifact.source != items.flores:
        raise ValueError(f"calibration items are {items.flores}, the artifact steers {artifact.source}")
    candidates = search_space(artifact.layers)
    conditions = {c: Condition(artifact.source, c.alpha, STEER_OF_POSITIONS[c.positions], c.layers)
                  for c in candidates}

    own_engine = llm is None
    if own_engine:
        llm = start_scoring_engine(resolve_model(model), dtype, enforce_eager=True)
    try:
        scorer = Scorer(llm, [{artifact.source: artifact_dir}], Timing(), progress)
        everything = np.arange(items.n)
        scorer.score([(items, condition, everything) for condition in [PLAIN, *conditions.values()]], maps=0)
        correct = {c: correct_choices(scorer.scores(items, conditions[c], 0), items.labels) for c in candidates}
        plain = correct_choices(scorer.scores(items, PLAIN, 0), items.labels)
        engine = engine_facts(llm)
    finally:
        if own_engine:
            shutdown_engine(llm)

    choice = choose_serving(correct, plain)
    delta = choice.cross_validated_accuracy - choice.plain_accuracy
    low, high = choice.delta_ci95
    verdict = (f"adopted {choice.config.describe()}" if choice.adopted else "gate not cleared, steering off")
    evidence = {
        "task": task, "file": str(items.path), "items": items.n,
        "plain_accuracy": choice.plain_accuracy, "cross_validated_accuracy": choice.cross_validated_accuracy,
        "delta": delta, "delta_ci95": [low, high], "adopted": choice.adopted,
        "fold_choices": choice.fold_choices, "candidate_accuracy": choice.candidate_accuracy,
        "rule": GATE_RULE, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "engine": engine,
        "summary": (f"{task} calibration on {items.n} items of {items.path.name}: cross-validated "
                    f"{100 * delta:+.1f} points over plain, 95% CI [{100 * low:+.1f}, {100 * high:+.1f}]; {verdict}"),
    }
    serving = (choice.config.as_serving() if choice.adopted
               else {"alpha": 0.0, "layers": artifact.layers, "positions": "last"})
    set_serving_defaults(artifact_dir, serving, evidence)
    return evidence
