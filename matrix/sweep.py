"""The interference sweep: one encoder per language and per unordered pair, as Ray tasks.

A sweep is described by a YAML file (configs/sweep/*.yaml):

    languages: [eng_Latn, fra_Latn, ...]   # FLORES-200 codes (any known code is normalised)
    training: ../training/cpu.yaml         # relative to the sweep file
    seed: 0                                # one seed for every run: same initialisation everywhere
    training_overrides: {steps: 100}       # optional
    tokenizer: null                        # tokenizer.json or HF dir; null = XLM-R
    data_dir: null                         # null = lingosteer.DEFAULT_DATA_DIR
    design: {partners_per_language: 2}     # optional: the partial design of matrix/design.py (default: all pairs)

Results live in a directory: `sweep.json` (what the sweep is; a rerun with a
different configuration is refused), `runs/<run id>.json` (one record per finished
run, written atomically by the driver, so a record is either complete or absent),
and `invocations.jsonl` (wall time of every `sweep run`). A rerun skips the runs
whose record exists, so a killed sweep resumes where it stopped; Ray retries runs
whose worker died. With `save_encoders`, the driver also writes each trained encoder
to `encoders/<run id>.safetensors` (weights and the corpus vocabulary) before its
record, which then names the file and its sha256; a run counts as done only when
both exist.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

import lingosteer
import matrix
import training
from lingosteer.files import atomic_path, sha256_files
from lingosteer.languages import normalize_code
from lingosteer.ray_runtime import ray_session
from matrix.design import choose_partners
from matrix.jsonio import write_json_atomic
from training.config import TrainingConfig, load_training_config
from training.corpus import SPECIAL_ROLES, build_corpus, language_data

FORMAT_VERSION = 1
RUNS_SUBDIR = "runs"
ENCODERS_SUBDIR = "encoders"
ENCODER_FORMAT = "lingosteer.sweep-encoder"
VOCABULARY_KEY = "vocabulary"  # the tensor beside the weights: tokenizer id of each compact id


@dataclass(frozen=True)
class SweepConfig:
    languages: tuple[str, ...]
    training: TrainingConfig
    seed: int = 0
    tokenizer: str | None = None
    data_dir: str | None = None
    source: str = ""  # the YAML file it came from
    partners_per_language: int | None = None  # None: the full design (every pair)

    def identity(self) -> dict:
        """What must match for two invocations to add records to the same results directory."""
        identity = {
            "languages": list(self.languages),
            "training": self.training.to_dict(),
            "seed": self.seed,
            "tokenizer": self.tokenizer,
        }
        if self.partners_per_language is not None:  # only then, so full-design directories keep their identity
            identity["design"] = {"partners_per_language": self.partners_per_language}
        return identity

    def design_pairs(self) -> list[tuple[str, str]] | None:
        """The pairs of the partial design, None for the full design."""
        return design_pairs(self.identity())


def design_pairs(identity: dict) -> list[tuple[str, str]] | None:
    """The pairs a sweep's design runs (from its identity, as in sweep.json); None for the full design."""
    design = identity.get("design")
    if not design:
        return None
    return choose_partners(tuple(identity["languages"]), design["partners_per_language"])


def load_sweep_config(path: str | Path) -> SweepConfig:

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    known = {"languages", "training", "seed", "training_overrides", "tokenizer", "data_dir", "design"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown sweep config keys {unknown}; known keys: {sorted(known)}")
    if "languages" not in values or "training" not in values:
        raise ValueError(f"{path}: a sweep config needs `languages` and `training`")
    languages = tuple(normalize_code(code) for code in values["languages"])
    if len(languages) < 2 or len(set(languages)) != len(languages):
        raise ValueError(f"{path}: a sweep needs at least two different languages, got {list(languages)}")
    training = load_training_config(path.parent / values["training"])
    training = training.replace(**(values.get("training_overrides") or {}))

    design = values.get("design") or {}
    if set(design) - {"partners_per_language"}:
        raise ValueError(f"{path}: `design` takes only partners_per_language, got {sorted(design)}")
    partners = design.get("partners_per_language")
    if partners is not None:
        choose_partners(languages, int(partners))  # a k this language list cannot support fails here

    def relative(key):
        return str(path.parent / values[key]) if values.get(key) else None

    return SweepConfig(
        languages, training, int(values.get("seed", 0)), relative("tokenizer"), relative("data_dir"), str(path),
        None if partners is None else int(partners),
    )


def run_id(languages: tuple[str, ...]) -> str:
    return "+".join(sorted(languages))


def plan_runs(languages: tuple[str, ...], pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, ...]]:
    """Monolingual runs first (they are the denominators), then the unordered pairs.

    With `pairs`, only those pairs and the monolingual runs of their languages.
    """
    if pairs is None:
        chosen_pairs = list(itertools.combinations(languages, 2))
    else:
        unknown = sorted({lang for pair in pairs for lang in pair} - set(languages))
        if unknown:
            raise ValueError(f"pair languages {unknown} are not in the sweep ({', '.join(languages)})")
        if any(a == b for a, b in pairs):
            raise ValueError("a pair needs two different languages")
        chosen_pairs = list(dict.fromkeys(tuple(sorted(pair)) for pair in pairs))
        languages = tuple(lang for lang in languages if any(lang in pair for pair in chosen_pairs))
    return [(lang,) for lang in languages] + [tuple(sorted(pair)) for pair in chosen_pairs]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`eng_Latn-fra_Latn,hin_Deva-urd_Arab` -> [(eng_Latn, fra_Latn), (hin_Deva, urd_Arab)]."""

    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        codes = item.split("-")
        if len(codes) != 2:
            raise ValueError(f"bad pair {item!r}: expected CODE-CODE with FLORES codes, e.g. eng_Latn-fra_Latn")
        pairs.append((normalize_code(codes[0]), normalize_code(codes[1])))
    if not pairs:
        raise ValueError(f"no pairs in {text!r}")
    return pairs


def prepare_results_dir(results: Path, config: SweepConfig) -> None:
    """Create the results directory, or check that it belongs to the same sweep."""
    (results / RUNS_SUBDIR).mkdir(parents=True, exist_ok=True)
    manifest = results / "sweep.json"
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        if existing.get("identity") != config.identity():
            raise ValueError(
                f"{results} holds results of a different sweep configuration (see {manifest}); "
                "use another --results directory"
            )
        return
    write_json_atomic(
        manifest, {"format_version": FORMAT_VERSION, "config": config.source, "identity": config.identity()}
    )


def check_runs(languages: tuple[str, ...], runs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Explicit runs (one language or a pair each, all in the sweep), sorted within and without duplicates."""
    unknown = sorted({lang for run in runs for lang in run} - set(languages))
    if unknown:
        raise ValueError(f"run languages {unknown} are not in the sweep ({', '.join(languages)})")
    if any(len(run) not in (1, 2) or len(set(run)) != len(run) for run in runs):
        raise ValueError("a run covers one language or two different ones")
    return list(dict.fromkeys(tuple(sorted(run)) for run in runs))


def done_runs(results: Path, with_encoders: bool = False) -> set[str]:
    """Run ids with a record (and, `with_encoders`, whose record names an encoder file that exists)."""
    done = set()
    for path in (results / RUNS_SUBDIR).glob("*.json"):
        if with_encoders:
            encoder = json.loads(path.read_text()).get("encoder")
            if not encoder or not (results / encoder["file"]).is_file():
                continue
        done.add(path.stem)
    return done


def save_encoder(results: Path, name: str, weights: dict, vocabulary) -> dict:
    """Write a run's encoder (numpy weights + vocabulary) as safetensors; returns its entry for the record."""
    from safetensors.numpy import save_file

    path = results / ENCODERS_SUBDIR / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        metadata = {"format": ENCODER_FORMAT, "format_version": str(FORMAT_VERSION), "run_id": name}
        save_file({**weights, VOCABULARY_KEY: vocabulary}, str(tmp), metadata=metadata)
    return {"file": f"{ENCODERS_SUBDIR}/{path.name}", "sha256": sha256_files(path)}


def load_encoder(results: str | Path, name: str):
    """(MaskedLMEncoder in eval mode, vocabulary) of a finished run saved with `save_encoders`."""
    from safetensors.torch import load_file

    from training.model import MaskedLMEncoder  # local: loads torch, which `lingosteer --help` must not pay for

    results = Path(results)
    record_path = results / RUNS_SUBDIR / f"{name}.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{results} has no record of run {name}")
    encoder = json.loads(record_path.read_text()).get("encoder")
    if not encoder:
        raise FileNotFoundError(f"run {name} in {results} was trained without saving its encoder")
    path = results / encoder["file"]
    if not path.is_file() or sha256_files(path) != encoder["sha256"]:
        raise ValueError(f"{path} is missing or does not match the sha256 in {record_path}")
    tensors = load_file(str(path))
    vocabulary = tensors.pop(VOCABULARY_KEY).numpy()
    training = TrainingConfig.from_dict(json.loads((results / "sweep.json").read_text())["identity"]["training"])
    model = MaskedLMEncoder(training, len(vocabulary), SPECIAL_ROLES.index("pad"), "sdpa")
    model.load_state_dict(tensors)
    return model.eval(), vocabulary


def load_records(results: str | Path) -> tuple[dict, list[dict]]:
    """(sweep manifest, run records) of a results directory."""
    results = Path(results)
    manifest_path = results / "sweep.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{results} is not a sweep results directory (no sweep.json)")
    records = []
    for path in sorted((results / RUNS_SUBDIR).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("run_id") != path.stem:
            raise ValueError(f"{path}: record run_id {record.get('run_id')!r} does not match its file name")
        records.append(record)
    return json.loads(manifest_path.read_text()), records


def _train_task(languages: tuple[str, ...], training: dict, corpus, seed: int, keep_encoder: bool):
    """Runs inside a Ray worker: one training run, returned as (record, numpy weights or None); the driver
    writes both."""
    import resource

    import torch

    from training.train import train_run  # local: loads torch (see above)

    torch.set_num_threads(1)  # one core per run; Ray schedules as many runs as there are CPUs
    started = datetime.now(timezone.utc).isoformat()
    wall = time.perf_counter()
    result, model = train_run(languages, TrainingConfig.from_dict(training), corpus, seed)
    weights = None
    if keep_encoder:
        weights = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
    record = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id(languages),
        **result.to_dict(),
        "wall_seconds": time.perf_counter() - wall,
        # CPU time of the whole worker process (imports included): the cost on a shared machine.
        "cpu_seconds": time.process_time(),
        # Each worker process runs one task (max_calls=1), so this is the run's own peak.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "pid": os.getpid(),  # the worker process that ran it (one run per process)
        "torch": torch.__version__,
    }
    return record, weights


@dataclass
class SweepOutcome:
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    wall_seconds: float = 0.0


def run_sweep(
    config: SweepConfig,
    results: str | Path,
    address: str | None = None,
    max_runs: int | None = None,
    pairs: list[tuple[str, str]] | None = None,
    num_cpus: int = 2,
    max_retries: int = 2,
    progress: bool = True,
    gpus_per_run: float = 0,
    runs: list[tuple[str, ...]] | None = None,
    save_encoders: bool = False,
) -> SweepOutcome:
    """Train the planned runs that are not done yet. `runs` replaces the plan (monolingual runs of all
    languages, then `pairs`, or else the config's design: its partner pairs or all pairs) with exactly those runs."""
    from tqdm import tqdm

    started = time.perf_counter()
    results = Path(results)
    language_data(config.languages, config.data_dir)  # a language without data stops the sweep before anything
    prepare_results_dir(results, config)
    if runs is None:
        planned = plan_runs(config.languages, pairs if pairs is not None else config.design_pairs())
    else:
        planned = check_runs(config.languages, runs)
    done = done_runs(results, with_encoders=save_encoders)
    pending = [run for run in planned if run_id(run) not in done]
    if max_runs is not None:
        pending = pending[:max_runs]
    outcome = SweepOutcome(skipped=len(planned) - len(pending))
    if not pending:
        return outcome

    corpus = build_corpus(
        config.languages, config.training.max_length, config.training.vocab_limit, config.tokenizer, config.data_dir
    )

    with ray_session(address, num_cpus, (lingosteer, matrix, training)) as ray:
        task = ray.remote(num_cpus=1, max_calls=1)(_train_task)
        corpus_ref = ray.put(corpus)
        training_settings = config.training.to_dict()
        futures = {
            task.options(max_retries=max_retries, retry_exceptions=True, num_gpus=gpus_per_run).remote(
                run, training_settings, corpus_ref, config.seed, save_encoders
            ): run
            for run in pending
        }
        with tqdm(total=len(futures), desc="sweep runs", unit="run", disable=not progress) as bar:
            remaining = list(futures)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                name = run_id(futures[ready[0]])
                try:
                    record, weights = ray.get(ready[0])
                except Exception as error:  # the run failed even after its retries
                    outcome.failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    bar.write(f"run {name} failed: {outcome.failed[name]}")
                else:
                    if weights is not None:  # the encoder before the record: a record never names a missing file
                        record["encoder"] = save_encoder(results, name, weights, corpus.vocabulary)
                    write_json_atomic(results / RUNS_SUBDIR / f"{name}.json", record)
                    outcome.completed.append(name)
                bar.update(1)
    outcome.wall_seconds = time.perf_counter() - started
    with open(results / "invocations.jsonl", "a") as log:
        log.write(
            json.dumps(
                {
                    "finished_at": datetime.now(timezone.utc).isoformat(),
                    "wall_seconds": outcome.wall_seconds,
                    "completed": len(outcome.completed),
                    "failed": len(outcome.failed),
                    "skipped": outcome.skipped,
                    "address": address or f"local ({num_cpus} CPUs)",
                    "machine": platform.machine(),
                    "cpu_count": os.cpu_count(),
                }
            )
            + "\n"
        )
    return outcome
