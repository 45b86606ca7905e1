"""Calibrated serving defaults for artifacts: score the candidates, let the gate's design decide, record the evidence.

`lingosteer align build` calls `calibrate_languages` after the fits. Every candidate of
`evaluation.calibration.search_space` and the plain run score the calibration items of each
artifact's language through one vLLM engine and the plugin that serves requests; the gate's
design (`evaluation.gate_designs.DESIGNS`) decides for all languages together; what the
calibration could have detected comes from `evaluation.gate_power.detectable_gain`; the result
goes into each manifest as `serving` + `evidence` (`alignment.artifact.set_serving_defaults`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alignment.artifact import Evidence, ServingDefaults, load_intervention, set_serving_defaults
from evaluation.calibration import GATE_RULE, search_space
from evaluation.gate_designs import DESIGNS, GateDecision, GateDesign
from evaluation.gate_designs import Evidence as GateEvidence
from evaluation.gate_power import Detectable, detectable_gain
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
from evaluation.tasks import Task, infer_task, load_prompts
from lingosteer.backend import shutdown_engine
from lingosteer.models import resolve_model


def load_calibration_sets(model: str, calibrate_paths: list[Path], languages: list[str], task: Task | None = None,
                          max_items: int | None = None):
    """(task, {FLORES code: `LanguageSet`}) of `languages` found under `calibrate_paths` (files, or directories
    of `<split>.<iso>.jsonl` files as `lingosteer bench` reads them), checked before anything slow runs."""
    from transformers import AutoTokenizer

    task = task or infer_task(calibrate_paths)
    config = BenchmarkConfig(task=task, model=model, eval_paths=list(calibrate_paths), max_items=max_items)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    sets = {s.flores: s for s in load_language_sets(config, calibrate_paths, tokenizer, load_prompts(task)).values()}
    missing = [language for language in languages if language not in sets]
    if missing:
        found = ", ".join(sorted(sets)) or "none"
        raise ValueError(f"no {task.name} calibration file for {', '.join(missing)} in "
                         f"{', '.join(map(str, calibrate_paths))} (languages found: {found})")
    return task, {language: sets[language] for language in languages}


def load_calibration_items(model: str, calibrate_paths: list[Path], language: str, task: Task | None = None,
                           max_items: int | None = None):
    """The calibration items of one language (a `LanguageSet`): `load_calibration_sets` for one."""
    task, sets = load_calibration_sets(model, calibrate_paths, [language], task, max_items)
    return task, sets[language]


def calibrate_serving(artifact_dir: Path, model: str, task: Task, items, dtype: str = "float32",
                      progress: bool = True, llm=None) -> Evidence:
    """One artifact under the single-language design ('current'); returns the evidence written."""
    return calibrate_languages({items.flores: (artifact_dir, items)}, model, task, DESIGNS["current"], dtype,
                               progress, llm)[items.flores]


def calibrate_languages(builds: Mapping[str, tuple[Path, object]], model: str, task: Task, design: GateDesign,
                        dtype: str = "float32", progress: bool = True, llm=None,
                        proxies: Mapping[str, object] | None = None) -> dict[str, Evidence]:
    """Choose and record the serving defaults of each language's artifact (`builds[language] = (artifact_dir,
    items)`) under `design`, deciding for all languages together; returns each language's evidence written.
    Starts one scoring engine for all unless given one (`llm`, as `evaluation.runner.start_scoring_engine` makes).
    `proxies[language]`: a design that reads a proxy set (`carry`) gets that language's larger labelled set of
    another task (a `LanguageSet`, as `load_calibration_sets` loads), scored the same way on the same engine."""
    design.check({language: items.n for language, (_, items) in builds.items()})
    if design.uses_proxy:
        design.check_proxy({language: proxies[language].n if proxies and language in proxies else None
                            for language in builds})
    elif proxies:
        raise ValueError(f"design {design.name!r} reads no proxy set")
    layers = {}
    for language, (artifact_dir, items) in builds.items():
        artifact = load_intervention(artifact_dir)
        if artifact.source != items.flores or language != items.flores:
            raise ValueError(f"calibration items are {items.flores}, the artifact steers {artifact.source}")
        layers[language] = artifact.layers

    own_engine = llm is None
    if own_engine:
        llm = start_scoring_engine(resolve_model(model), dtype, enforce_eager=True)
    try:
        evidence = {language: _score(llm, artifact_dir, items, layers[language], progress)
                    for language, (artifact_dir, items) in builds.items()}
        if design.uses_proxy:
            evidence = {language: dataclasses.replace(e, proxy=_score(llm, builds[language][0], proxies[language],
                                                                      layers[language], progress))
                        for language, e in evidence.items()}
        engine = engine_facts(llm)
    finally:
        if own_engine:
            shutdown_engine(llm)

    decisions = design.decide(evidence)
    # A shared design decides the languages together: its power is that of the whole build.
    detectable = ({language: detectable_gain(design, evidence) for language in evidence} if design.shared else
                  {language: detectable_gain(design, {language: e}) for language, e in evidence.items()})
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    written = {}
    for language, (artifact_dir, items) in builds.items():
        record = _evidence(task, items, design, list(builds), evidence[language], decisions[language],
                           detectable[language], date, engine)
        if design.uses_proxy:
            proxy = proxies[language]
            record = record.model_copy(update={"rule": f"{record.rule} Proxy set: {proxy.path.name} "
                                                       f"({proxy.n} items, all candidates scored)."})
        serving = decisions[language].config or ServingDefaults(alpha=0.0, layers=layers[language], positions="last")
        set_serving_defaults(artifact_dir, serving, record)
        written[language] = record
    return written


def _score(llm, artifact_dir: Path, items, layers: list[int], progress: bool) -> GateEvidence:
    """Per-item correctness of the plain run and of every candidate on `items`."""
    candidates = search_space(layers)
    conditions = {c: Condition(items.flores, c.alpha, c.positions, c.layers) for c in candidates}
    scorer = Scorer(llm, [{items.flores: artifact_dir}], Timing(), progress)
    everything = np.arange(items.n)
    scorer.score([(items, condition, everything) for condition in [PLAIN, *conditions.values()]], maps=0)
    return GateEvidence(correct_choices(scorer.scores(items, PLAIN, 0), items.labels),
                        {c: correct_choices(scorer.scores(items, conditions[c], 0), items.labels) for c in candidates})


def decision_wording(decision: GateDecision, detectable: Detectable) -> str:
    """The verdict for people, with what the calibration could have detected at all (80% power)."""
    floor = f"{100 * (detectable.gain if detectable.gain is not None else detectable.largest_gain):.1f}"
    if decision.adopted:
        return f"on: {decision.config.describe()} ({decision.reason}); gains above {floor} points were detectable"
    return f"off: no gain detectable; this calibration could only have detected gains above {floor} points"


def _evidence(task: Task, items, design: GateDesign, languages: list[str], gate: GateEvidence,
              decision: GateDecision, detectable: Detectable, date: str, engine: dict) -> Evidence:
    plain = float(gate.plain.mean())
    choice = decision.choice
    ci = f", 95% CI [{100 * choice.delta_ci95[0]:+.1f}, {100 * choice.delta_ci95[1]:+.1f}]" if choice else ""
    verdict = (f"adopted {decision.config.describe()}" if decision.adopted else "gate not cleared, steering off")
    wording = decision_wording(decision, detectable)
    return Evidence(
        task=task.name, file=str(items.path), items=int(items.n), plain_accuracy=plain,
        cross_validated_accuracy=plain + decision.delta, delta=decision.delta,
        delta_ci95=list(choice.delta_ci95) if choice else None, adopted=decision.adopted,
        fold_choices=choice.fold_choices if choice else [],
        candidate_accuracy={c.describe(): float(row.mean()) for c, row in gate.correct.items()},
        rule=f"{GATE_RULE} Design '{design.name}' decides: {design.summary}.", date=date, engine=engine,
        summary=(f"{task.name} calibration on {items.n} items of {items.path.name}: held-out "
                 f"{100 * decision.delta:+.1f} points over plain{ci}; {verdict} "
                 f"(gate design {design.name}; {wording})"),
        design=design.name, languages=languages, discordance=detectable.discordance,
        minimum_detectable_gain=None if detectable.gain is None else 100 * detectable.gain, decision=wording,
    )
