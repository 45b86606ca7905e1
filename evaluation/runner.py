"""One benchmark run: load files, pick alphas on calibration data, score, compare.

Three ways to set alpha per language (the evaluation items never influence it):
- calibrate files: every alpha of the grid is scored on the calibration items of that
  language; `calibration.choose_alpha` picks one; then the evaluation items are
  scored once plain and once with that alpha.
- cross-fit K: the evaluation items of each language are cut into K contiguous folds;
  the items of fold k are scored with the alpha chosen on the other folds. (With only
  a validation split at hand: calibrate on one half, evaluate on the other, swap.)
  Fold k's choice is made from the other folds' rows only. With K interventions
  directories, directory k's maps are used for fold k, both for its calibration on
  the other folds and for its evaluation: maps fitted on translations of the other
  folds' items never see fold k.
- neither: the default alpha in each intervention's manifest.
- no interventions at all: every language is scored plain (a baseline run).

English files (`*.en.*`) are scored plain only: they are the reference for transfer
efficiency (accuracy / English accuracy), not an intervention target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignment.artifact import artifact_version, discover_interventions, load_intervention, read_manifest
from alignment.hidden_states import load_model_and_tokenizer
from evaluation.calibration import DEFAULT_GRID, choose_alpha, contiguous_folds
from evaluation.report import build_report
from evaluation.score_store import ScoreStore
from evaluation.scoring import (
    PLAIN,
    Condition,
    Encoded,
    VllmScores,
    encode_examples,
    score_with_hf,
    score_with_vllm,
    served_condition,
)
from evaluation.tasks import Example, Task, build_examples, find_files, load_items, load_prompts
from intervene_engine.request_spec import InterventionRequest
from alignment.artifact import DEFAULT_POSITIONS, POSITION_MODES
from lingosteer.backend import cpu_model_name, is_cpu_backend, scoring_engine_kwargs, shutdown_engine
from lingosteer.files import sha256_files
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import normalize_code
from lingosteer.models import resolve_model

ENGLISH = "eng_Latn"


@dataclass
class BenchmarkConfig:
    task: Task
    model: str | Path
    eval_paths: list
    interventions: Path | list[Path] | None = None  # one directory, or one per cross-fit fold
    calibrate_paths: list | None = None
    cross_fit: int | None = None
    alpha_grid: tuple[float, ...] = DEFAULT_GRID
    steer: str = DEFAULT_POSITIONS  # a position mode
    prompt_style: str = "lm-eval"
    prompts_path: Path | None = None
    groups_path: Path | None = None
    max_items: int | None = None
    skip_items: int = 0  # leave out the first N items of each evaluation file (e.g. those calibrated on)
    reference: str | None = None  # "hf": cross-check and time against HF transformers
    reference_sample: int = 20
    bootstrap: int = 10000
    seed: int = 0
    progress: bool = True
    # Pinned, not chosen from the CPU: a CPU with native bfloat16 moved 4 of 11 XCOPA
    # languages by 1-2 points against float32, so reports compare only at one dtype.
    dtype: str = "float32"
    scores_dir: Path | None = None  # where scores are written as they complete; a rerun resumes from it
    incline: Path | None = None  # INCLINE-form artifacts: also score INCLINE as published on the same items

    @property
    def plain_only(self) -> bool:
        """No interventions given: a plain baseline of every language."""
        return self.interventions is None


@dataclass
class LanguageSet:
    """One language's items of one file, as prompts and token ids."""

    code: str  # as in the file name
    flores: str
    path: Path
    examples: list[Example]
    encoded: list[list[Encoded]]
    labels: np.ndarray
    first_item: int = 0  # the file's index of examples[0]
    file_version: str = ""  # sha256 prefix of the file's bytes: stored scores are valid only for it

    @property
    def file_indices(self) -> np.ndarray:
        """The file's index of each item."""
        return self.first_item + np.arange(self.n)

    @property
    def table_prefix(self) -> str:
        """Names the items in a score store: the file, its content, which of its items."""
        return f"{self.path}@{self.file_version}[{self.first_item}:{self.first_item + self.n}]"

    @property
    def n(self) -> int:
        return len(self.examples)

    @property
    def english(self) -> bool:
        return self.flores == ENGLISH


@dataclass
class Timing:
    seconds: float = 0.0
    item_conditions: int = 0  # items scored, counting an item once per condition
    sequences: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prefix cache

    def add(self, scored: VllmScores, item_conditions: int, sequences: int) -> None:
        self.seconds += scored.seconds
        self.item_conditions += item_conditions
        self.sequences += sequences
        self.prompt_tokens += scored.prompt_tokens
        self.cached_tokens += scored.cached_tokens


@dataclass
class Outcome:
    """Per language: correctness under both conditions, the alpha(s) used and how they were chosen."""

    baseline: np.ndarray  # bool [n]
    intervened: np.ndarray  # bool [n]
    baseline_scores: np.ndarray  # [n, options]
    intervened_scores: np.ndarray
    alpha_per_item: np.ndarray  # [n]
    alpha: float | list[float] | None
    calibration: dict = field(default_factory=dict)
    fold_of_item: np.ndarray | None = None
    maps_of_item: np.ndarray | None = None  # which intervention set each item was evaluated with


def run_benchmark(config: BenchmarkConfig, llm=None) -> tuple[dict, list[dict]]:
    """Run the benchmark; returns (report, per-item records). Creates the vLLM engine unless given one."""
    from transformers import AutoTokenizer

    _check_config(config)
    model_dir = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(config.task, config.prompts_path)
    eval_sets = load_language_sets(config, config.eval_paths, tokenizer, prompts, config.skip_items)
    cal_sets = load_language_sets(config, config.calibrate_paths, tokenizer, prompts) if config.calibrate_paths else {}
    targets = [s for s in eval_sets.values() if not s.english]
    missing = [s.code for s in targets if config.calibrate_paths and s.code not in cal_sets]
    if missing:
        raise ValueError(f"no calibration file for language(s) {', '.join(missing)}")
    map_sets = ([find_interventions(root, [s.flores for s in targets], model_dir)
                 for root in _intervention_dirs(config)]
                if targets and not config.plain_only else [{}])

    own_engine = llm is None
    if own_engine:
        llm = start_scoring_engine(model_dir, config.dtype,
                                   enforce_eager=not compile_pays_back(config, eval_sets, cal_sets))
    try:
        timing = Timing()
        store = ScoreStore(config.scores_dir, _store_key(config, model_dir, map_sets)) if config.scores_dir else None
        scorer = Scorer(llm, map_sets, timing, config.progress, store)
        outcomes = _score_all(config, scorer, eval_sets, cal_sets)
        reference = None
        if config.reference == "hf":
            reference = _reference_check(config, scorer, model_dir, tokenizer, eval_sets, outcomes)
    finally:
        if own_engine:
            shutdown_engine(llm)

    report = build_report(config, model_dir, eval_sets, outcomes, map_sets, timing, reference, engine_facts(llm))
    if config.incline is not None:
        report["incline"] = run_incline(config, model_dir, eval_sets)
    return report, _item_records(eval_sets, outcomes)


def run_incline(config: BenchmarkConfig, model_dir: Path, eval_sets: dict[str, LanguageSet]) -> dict:
    """INCLINE as published (evaluation/incline.py) on the same items, with HF transformers: its
    non-compounding edit needs a clean pass first, which the serving plugin does not run.

    Each language's correctness is stored under `scores_dir/incline` as soon as it is scored
    (`ScoreStore`), so a rerun after an interruption scores only the languages still missing."""
    from evaluation import incline  # local: loads torch and transformers, which only INCLINE runs need

    targets = [s for s in eval_sets.values() if not s.english]
    found = find_interventions(config.incline, [s.flores for s in targets], model_dir)
    store = _incline_store(config, model_dir, found) if config.scores_dir else None
    model = tokenizer = None
    languages = {}
    for s in targets:
        items = load_item_range(config, s.path, s.first_item)
        names = {metric: f"{s.code}:{s.table_prefix}:{metric}" for metric in incline.METRICS}
        stored = {metric: store.load(name, (len(incline.GRID), s.n)) if store else None
                  for metric, name in names.items()}
        if all(table is not None and not np.isnan(table).any() for table in stored.values()):
            correct = {metric: table.astype(bool) for metric, table in stored.items()}
        else:
            if model is None:
                model, tokenizer = load_model_and_tokenizer(model_dir)
            correct = incline.score_items(model, tokenizer, load_intervention(found[s.flores]), items,
                                          task=config.task, progress=config.progress)
            if store:
                for metric, table in correct.items():
                    store.save(names[metric], table.astype(float))
        languages[s.code] = {"intervention": str(found[s.flores]),
                             **{metric: incline.summarise(c, resamples=config.bootstrap, seed=config.seed)
                                for metric, c in correct.items()}}
    return incline.report_section(languages, config.bootstrap, config.seed)


def _incline_store(config: BenchmarkConfig, model_dir: Path, found: dict[str, Path]) -> ScoreStore:
    """Where INCLINE's correctness tables go as they complete, keyed by all they depend on: model,
    INCLINE's prompt and answers for the task, the strength grid, each INCLINE artifact's version."""
    from dataclasses import asdict

    # local: loads torch, which `lingosteer --help` (it imports this module) must not pay for
    from evaluation import incline

    key = {"model": model_fingerprint(model_dir), "task": asdict(config.task.incline),
           "grid": list(incline.GRID),
           "interventions": {lang: artifact_version(path) for lang, path in sorted(found.items())}}
    return ScoreStore(Path(config.scores_dir) / "incline", key)


def _store_key(config: BenchmarkConfig, model_dir: Path, map_sets: list[dict[str, Path]]) -> dict:
    """What stored scores depend on: model, dtype, prompts, and each intervention set's versions."""
    return {"model": model_fingerprint(model_dir), "dtype": config.dtype, "prompt_style": config.prompt_style,
            "prompts": load_prompts(config.task, config.prompts_path),
            "interventions": [{lang: artifact_version(path) for lang, path in sorted(maps.items())}
                              for maps in map_sets]}


# ---- inputs -------------------------------------------------------------------------


def _intervention_dirs(config) -> list[Path]:
    """One directory for every item, or (under cross-fit K) one per fold: directory k holds
    the interventions used for fold k, fitted without fold k's items."""
    roots = config.interventions
    roots = [] if roots is None else [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    if not roots:
        raise ValueError("--interventions is required to evaluate non-English languages")
    if len(roots) > 1 and len(roots) != config.cross_fit:
        raise ValueError(f"got {len(roots)} interventions directories: give one, or one per fold with "
                         f"--cross-fit {len(roots)} (directory k is used for fold k)")
    return roots


def _check_config(config: BenchmarkConfig) -> None:
    if config.steer not in POSITION_MODES:
        raise ValueError(f"steer must be one of {tuple(POSITION_MODES)}, got {config.steer!r}")
    if config.calibrate_paths and config.cross_fit:
        raise ValueError("give either calibration files or --cross-fit, not both")
    if config.max_items is not None and config.max_items < 1:
        raise ValueError("--max-items must be positive")
    if config.skip_items < 0:
        raise ValueError("--skip-items must be 0 or more")
    if config.plain_only and (config.calibrate_paths or config.cross_fit):
        raise ValueError("calibration and --cross-fit choose an alpha for interventions: give --interventions too")
    if config.reference not in (None, "hf"):
        raise ValueError(f"reference must be 'hf', got {config.reference!r}")
    if config.reference and config.reference_sample < 1:
        raise ValueError("--reference-sample must be positive")


def load_language_sets(config, paths, tokenizer, prompts, skip: int = 0) -> dict[str, LanguageSet]:
    """Per language file under `paths`: its items from index `skip` on, at most `config.max_items`."""

    sets = {}
    for code, path in find_files(config.task, paths).items():
        items = load_item_range(config, path, skip)
        if not items:
            raise ValueError(f"{path}: no items left after skipping the first {skip}")
        examples = build_examples(config.task, code, items, prompts, config.prompt_style)
        sets[code] = LanguageSet(code, normalize_code(code), path, examples, encode_examples(tokenizer, examples),
                                 np.array([ex.label for ex in examples]), skip, sha256_files(path)[:16])
    return sets


def load_item_range(config, path: Path, skip: int = 0) -> list:
    """The items of `path` from index `skip` on, at most `config.max_items` of them."""
    end = None if config.max_items is None else skip + config.max_items
    return load_items(config.task, path)[skip:end]


def find_interventions(root: Path, languages: list[str] | None, model_dir: Path) -> dict[str, Path]:
    """FLORES code -> artifact directory under `root` fitted on the model, for each language (None:
    every language found; see `alignment.artifact.discover_interventions`), each validated in full
    now rather than when the engine first loads it."""
    found = discover_interventions(root, languages, model_fingerprint(model_dir))
    for path in found.values():
        load_intervention(path)
    return found


def fitted_items(artifact_dir: Path) -> tuple[str, list[list[int]]] | None:
    """(file name, [start, end) item ranges) of benchmark items an intervention was fitted on, if any.

    Fitting scripts record them as the manifest's `fit_data.task_items`."""
    task_items = read_manifest(artifact_dir).fit_data.task_items
    return None if task_items is None else (task_items.file, task_items.ranges)


def _file_indices_within(lang_set: LanguageSet, items: np.ndarray, ranges) -> np.ndarray:
    """The file indices of `lang_set`'s `items` that fall in one of the [start, end) `ranges`."""
    in_file = lang_set.file_indices[np.asarray(items)]
    inside = np.zeros(in_file.size, dtype=bool)
    for start, end in ranges:
        inside |= (in_file >= start) & (in_file < end)
    return in_file[inside]


def check_not_fitted_on(artifact_dir: Path, lang_set: LanguageSet, items: np.ndarray) -> None:
    """Refuse to evaluate items whose own text went into the intervention's fit."""
    fitted = fitted_items(artifact_dir)
    if fitted is None or fitted[0] != lang_set.path.name:
        return
    overlap = _file_indices_within(lang_set, items, fitted[1])
    if overlap.size:
        raise ValueError(
            f"{artifact_dir} was fitted on items {fitted[1]} of {fitted[0]}, and items {overlap.min()}-{overlap.max()} "
            f"of {lang_set.path} would be evaluated with it; under --cross-fit K give K interventions "
            "directories, directory k fitted without fold k's items"
        )


def check_not_calibrated_on(artifact, lang_set: LanguageSet, task: Task) -> None:
    """Refuse to report an artifact's calibrated serving defaults on the items that chose them.

    `align build` calibrates on the first `evidence.items` items of its file, so the file's
    later items (`--skip-items`) or another file are fair; the calibration items are not."""
    evidence = artifact.evidence
    if evidence is None or evidence.task != task.name or Path(evidence.file).name != lang_set.path.name:
        return
    calibrated = evidence.items
    overlap = _file_indices_within(lang_set, np.arange(lang_set.n), [(0, calibrated)])
    if overlap.size:
        raise ValueError(
            f"{artifact.path}: its serving defaults were chosen on items 0-{calibrated - 1} of {lang_set.path.name}, "
            f"and this run would report them on items {overlap.min()}-{overlap.max()}; "
            f"evaluate on items it was not calibrated on (--skip-items {calibrated}) or on another file"
        )


# Scoring asks for the logits of every prompt token: a step of T tokens holds T x vocab
# fp32 logits (4 GiB for 4096 tokens with Gemma 3's 262k vocabulary). Smaller steps
# keep that bounded at the same arithmetic.
SCORING_STEP_TOKENS = 1024
# torch.compile made Gemma 3 270M's engine start 85 s later and scored XCOPA 24 s faster
# per 48,765 prompt tokens (bench/scoring.py, 2 cores): it pays back past ~170k tokens.
# Re-measured on the fast path (2026-12-01, docs/benchmarks.md): ~37 s later, 77 s faster on
# XNLI sw's 424k prompt tokens (past ~205k), and nothing gained on XCOPA's short items.
COMPILE_PAYS_BACK_TOKENS = 200_000
# Items (of any condition) per `generate` between writes of the score store: big enough
# to keep the engine's batches full, small enough that an interruption loses little.
SCORING_CHUNK_ITEMS = 2000


def compile_pays_back(config: BenchmarkConfig, eval_sets: dict, cal_sets: dict) -> bool:
    """Whether the run scores enough prompt tokens for torch.compile's start-up to pay back."""
    def tokens(sets):
        return sum(len(enc.token_ids) for s in sets.values() for options in s.encoded for enc in options)

    grid = 0 if config.plain_only else len(config.alpha_grid)
    # plain + the chosen alpha on the evaluation items, the grid on calibration (or on them, cross-fitted)
    total = tokens(eval_sets) * (2 + (grid if config.cross_fit else 0)) + tokens(cal_sets) * grid
    return total >= COMPILE_PAYS_BACK_TOKENS


def start_scoring_engine(model_dir: Path, dtype: str, **overrides):
    """An offline `vllm.LLM` for `score_with_vllm`: token ids in, log-probabilities out, no
    tokenizer (`lingosteer.backend.scoring_engine_kwargs`); `overrides` win."""
    from vllm import LLM

    return LLM(**scoring_engine_kwargs(model_dir, dtype=dtype, max_num_batched_tokens=SCORING_STEP_TOKENS,
                                       **overrides))


def engine_facts(llm) -> dict:
    """What the numbers depend on besides the model and the items: dtype, CPU, vLLM."""
    import vllm

    model_config = llm.llm_engine.model_config
    return {"dtype": str(model_config.dtype).removeprefix("torch."), "device": "cpu" if is_cpu_backend() else "gpu",
            "cpu": cpu_model_name(), "vllm": vllm.__version__, "enforce_eager": model_config.enforce_eager}


# ---- scoring ------------------------------------------------------------------------


class Scorer:
    """Option scores [n, options] per (file, condition, intervention set), filled on demand.

    `map_sets[m]` is one set of interventions (FLORES code -> artifact); one set is loaded
    in the engine at a time. An entry's rows stay NaN until scored, so an item is never
    scored twice under one condition and set. Plain scores do not depend on the set.
    """

    def __init__(self, llm, map_sets: list[dict[str, Path]], timing: Timing, progress: bool,
                 store: ScoreStore | None = None, chunk_items: int = SCORING_CHUNK_ITEMS):
        self.llm, self.map_sets, self.timing, self.progress = llm, map_sets, timing, progress
        self.store, self.chunk_items = store, chunk_items
        self.loaded: int | None = None
        self._scores: dict[tuple, np.ndarray] = {}

    def scores(self, s: LanguageSet, condition: Condition, maps: int) -> np.ndarray:
        key = (s.table_prefix, condition, None if condition.plain else maps)
        if key not in self._scores:
            shape = (s.n, len(s.examples[0].options))
            self._scores[key] = self.store.load(_table_name(key), shape) if self.store else np.full(shape, np.nan)
        return self._scores[key]

    def load(self, maps: int) -> None:
        if self.loaded != maps:
            for path in self.map_sets[maps].values():
                self.llm.collective_rpc("lingosteer_load", args=(str(path),))
            self.loaded = maps

    def score(self, wanted: list[tuple[LanguageSet, Condition, np.ndarray]], maps: int) -> None:
        """Score the (set, condition, items) not scored yet, under intervention set `maps`, in one `generate`."""
        todo: dict[tuple, tuple[LanguageSet, Condition, set]] = {}
        for s, condition, items in wanted:
            entry = todo.setdefault((s.table_prefix, condition), (s, condition, set()))
            entry[2].update(int(i) for i in items)
        pending = [(s, condition, i) for s, condition, items in todo.values()
                   for i in sorted(items) if np.isnan(self.scores(s, condition, maps)[i, 0])]
        if not pending:
            return
        self.load(maps)
        # In chunks, each written to the store as soon as it is scored: an interrupted run
        # loses at most one chunk.
        for start in range(0, len(pending), self.chunk_items):
            chunk = pending[start : start + self.chunk_items]
            requests = [(enc, condition) for s, condition, i in chunk for enc in s.encoded[i]]
            scored = score_with_vllm(self.llm, requests, self.progress)
            self.timing.add(scored, len(chunk), len(requests))
            offset, touched = 0, {}
            for s, condition, i in chunk:
                table = self.scores(s, condition, maps)
                table[i] = scored.scores[offset : offset + table.shape[1]]
                offset += table.shape[1]
                touched[(s.table_prefix, condition, None if condition.plain else maps)] = table
            if self.store:
                for key, table in touched.items():
                    self.store.save(_table_name(key), table)


def _table_name(key: tuple) -> str:
    items, condition, maps = key
    return f"{items}|{condition}|maps={maps}"


def correct_choices(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return scores.argmax(axis=1) == labels


def _condition(lang_set: LanguageSet, alpha: float, steer: str) -> Condition:
    # alpha 0 leaves the stream unchanged: it is the plain run, scored once.
    return PLAIN if alpha == 0 else Condition(lang_set.flores, float(alpha), steer)


def _calibrate(scorer: Scorer, s: LanguageSet, items: np.ndarray, grid, steer, maps: int) -> tuple[float, list[float]]:
    """The alpha chosen on `items` of `s` (already scored under the grid) and the grid's accuracies."""
    correct = np.stack([correct_choices(scorer.scores(s, _condition(s, a, steer), maps)[items], s.labels[items])
                        for a in grid])
    return choose_alpha(grid, correct)


def _score_all(config, scorer: Scorer, eval_sets, cal_sets) -> dict[str, Outcome]:
    grid, steer = tuple(config.alpha_grid), config.steer
    targets = [s for s in eval_sets.values() if not s.english]
    everything = lambda s: np.arange(s.n)  # noqa: E731
    scorer.score([(s, PLAIN, everything(s)) for s in eval_sets.values()], maps=0)
    outcomes: dict[str, Outcome] = {}

    if config.plain_only:
        for s in targets:
            base = scorer.scores(s, PLAIN, 0)
            correct = correct_choices(base, s.labels)
            outcomes[s.code] = Outcome(correct, correct, base, base, np.zeros(s.n), None,
                                       {"source": "no interventions: plain baseline"})
    elif config.cross_fit:
        folds = {s.code: contiguous_folds(s.n, config.cross_fit) for s in targets}
        maps_of_fold = [k if len(scorer.map_sets) > 1 else 0 for k in range(config.cross_fit)]
        choices: dict[tuple[str, int], tuple[float, list[float]]] = {}
        for maps in dict.fromkeys(maps_of_fold):
            fold_ids = [k for k, m in enumerate(maps_of_fold) if m == maps]
            others = {(s.code, k): np.setdiff1d(everything(s), folds[s.code][k]) for s in targets for k in fold_ids}
            for s in targets:
                for k in fold_ids:
                    check_not_fitted_on(scorer.map_sets[maps][s.flores], s, folds[s.code][k])
            scorer.score([(s, _condition(s, a, steer), others[(s.code, k)])
                          for s in targets for k in fold_ids for a in grid], maps)
            for s in targets:
                for k in fold_ids:
                    choices[(s.code, k)] = _calibrate(scorer, s, others[(s.code, k)], grid, steer, maps)
            scorer.score([(s, _condition(s, choices[(s.code, k)][0], steer), folds[s.code][k])
                          for s in targets for k in fold_ids], maps)
        for s in targets:
            outcomes[s.code] = _cross_fit_outcome(scorer, s, folds[s.code], choices, maps_of_fold, steer)
    else:
        alphas, conditions, calibration = {}, {}, {}
        if config.calibrate_paths:
            cal_targets = [cal_sets[s.code] for s in targets]
            scorer.score([(c, _condition(c, a, steer), everything(c)) for c in cal_targets for a in grid], maps=0)
            for s, c in zip(targets, cal_targets):
                alpha, accuracy = _calibrate(scorer, c, everything(c), grid, steer, maps=0)
                alphas[s.code], conditions[s.code] = alpha, _condition(s, alpha, steer)
                calibration[s.code] = {"file": str(c.path), "n": c.n, "grid_accuracy": accuracy}
        else:
            for s in targets:
                # The artifact's serving defaults: what a served request naming only its language gets.
                artifact = load_intervention(scorer.map_sets[0][s.flores])
                check_not_calibrated_on(artifact, s, config.task)
                serving = artifact.serving
                alphas[s.code] = serving.alpha
                conditions[s.code] = served_condition(InterventionRequest(s.flores), serving)
                calibration[s.code] = {"source": "the artifact's serving defaults",
                                       "serving": serving.model_dump(mode="json"),
                                       "evidence": artifact.evidence.summary if artifact.evidence else "not calibrated"}
        for s in targets:
            check_not_fitted_on(scorer.map_sets[0][s.flores], s, everything(s))
        scorer.score([(s, conditions[s.code], everything(s)) for s in targets], maps=0)
        for s in targets:
            base = scorer.scores(s, PLAIN, 0)
            inter = scorer.scores(s, conditions[s.code], 0)
            outcomes[s.code] = Outcome(correct_choices(base, s.labels), correct_choices(inter, s.labels), base, inter,
                                       np.full(s.n, alphas[s.code]), alphas[s.code], calibration[s.code],
                                       maps_of_item=np.zeros(s.n, dtype=int))
    for s in eval_sets.values():
        if s.english:
            base = scorer.scores(s, PLAIN, 0)
            correct = correct_choices(base, s.labels)
            outcomes[s.code] = Outcome(correct, correct, base, base, np.zeros(s.n), None)
    return outcomes


def _cross_fit_outcome(scorer: Scorer, s: LanguageSet, folds, choices, maps_of_fold, steer) -> Outcome:
    """Fold k's items under the alpha chosen on the other folds (and fold k's intervention set)."""
    base = scorer.scores(s, PLAIN, 0)
    inter = np.empty_like(base)
    alpha_per_item, fold_of_item, maps_of_item = np.empty(s.n), np.empty(s.n, dtype=int), np.empty(s.n, dtype=int)
    for k, held_out in enumerate(folds):
        alpha = choices[(s.code, k)][0]
        inter[held_out] = scorer.scores(s, _condition(s, alpha, steer), maps_of_fold[k])[held_out]
        alpha_per_item[held_out], fold_of_item[held_out], maps_of_item[held_out] = alpha, k, maps_of_fold[k]
    calibration = {"cross_fit": len(folds), "folds": [[int(f[0]), int(f[-1]) + 1] for f in folds],
                   "grid_accuracy_by_fold": [choices[(s.code, k)][1] for k in range(len(folds))]}
    return Outcome(correct_choices(base, s.labels), correct_choices(inter, s.labels), base, inter, alpha_per_item,
                   [choices[(s.code, k)][0] for k in range(len(folds))], calibration, fold_of_item, maps_of_item)


# ---- the HF reference ---------------------------------------------------------------


def _reference_check(config, scorer: Scorer, model_dir, tokenizer, eval_sets, outcomes) -> dict:
    """Score a sample with vLLM and with HF transformers (same requests): agreement and speed.

    The sample is the first items of each evaluation language, in turn, up to
    `reference_sample` items, among those evaluated with the intervention set loaded
    last; each is scored plain and under the alpha it was evaluated with.
    """

    maps = scorer.loaded if scorer.loaded is not None else 0
    sets = list(eval_sets.values())
    per_language = math.ceil(config.reference_sample / len(sets))
    requests, group_sizes, items = [], [], 0
    for s in sets:
        o = outcomes[s.code]
        eligible = np.arange(s.n) if s.english else np.flatnonzero(o.maps_of_item == maps)
        for i in eligible[: min(per_language, config.reference_sample - items)]:
            items += 1
            for condition in dict.fromkeys([PLAIN, _condition(s, o.alpha_per_item[i], config.steer)]):
                requests += [(enc, condition) for enc in s.encoded[i]]
                group_sizes.append(len(s.encoded[i]))
    scorer.load(maps)
    scored = score_with_vllm(scorer.llm, requests, config.progress)
    vllm_scores, vllm_seconds = scored.scores, scored.seconds
    model, _ = load_model_and_tokenizer(model_dir)
    interventions = {flores: load_intervention(path) for flores, path in scorer.map_sets[maps].items()}
    hf_scores, hf_seconds = score_with_hf(model, requests, interventions, tokenizer.pad_token_id or 0,
                                          batch_size=max(group_sizes), progress=config.progress)
    diff = np.abs(vllm_scores - hf_scores)
    bounds = np.cumsum([0, *group_sizes])
    agree = [vllm_scores[a:b].argmax() == hf_scores[a:b].argmax() for a, b in zip(bounds[:-1], bounds[1:])]
    return {
        "implementation": "HF transformers, float32, forward hooks (alignment.hf_steering.steered), "
                          "one padded batch per item and condition",
        "items": items,
        "item_conditions": len(group_sizes),
        "sequences": len(requests),
        "vllm_seconds": vllm_seconds,
        "hf_seconds": hf_seconds,
        "vllm_items_per_s": len(group_sizes) / vllm_seconds,
        "hf_items_per_s": len(group_sizes) / hf_seconds,
        "speed_ratio": hf_seconds / vllm_seconds,
        "max_abs_loglik_diff": float(diff.max()),
        "mean_abs_loglik_diff": float(diff.mean()),
        "prediction_agreement": float(np.mean(agree)),
    }


def _item_records(eval_sets, outcomes) -> list[dict]:
    records = []
    for s in eval_sets.values():
        o = outcomes[s.code]
        for i in range(s.n):
            records.append({
                "language": s.code, "index": int(s.file_indices[i]), "label": int(s.labels[i]),
                "fold": None if o.fold_of_item is None else int(o.fold_of_item[i]),
                "alpha": None if s.english else float(o.alpha_per_item[i]),
                "baseline_scores": [float(x) for x in o.baseline_scores[i]],
                "intervened_scores": [float(x) for x in o.intervened_scores[i]],
                "baseline_correct": bool(o.baseline[i]), "intervened_correct": bool(o.intervened[i]),
            })
    return records
