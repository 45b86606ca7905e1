"""Does interference predict downstream accuracy? The interference-matrix paper's Table 1 at sweep scale.

For each target language A, the matrix names its partners: the `per_side` with the
least interference (largest I[A,B], closest to 0) and the `per_side` with the most
(most negative I[A,B]). The sweep's own training code and recipe train A's
monolingual encoder and the A+B pair encoders (Ray tasks of `matrix.sweep.run_sweep`,
same resume and retry guarantees; the encoders are saved as safetensors in the
results directory, so evaluation reruns without training). With the matrix's
languages, recipe and seed, these are the matrix's own models: their MLM losses are
checked against the matrix's entries and the difference is reported.

Evaluation (MTEB-style classification): A's SIB-200 topic classification (7 topics),
frozen encoder, sentence embedding = final hidden states mean-pooled over the
sentence's tokens; a scikit-learn logistic regression (standardised features) is
fitted on the `train` split and scored on the `test` split. Every model is scored on
the same test items, so differences are paired. The same encoder at its
initialisation (untrained; every run starts from it) is the floor.

The finding follows DECISION_RULE, fixed before any result existed (`decide`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lingosteer import config_path
from lingosteer.data import load_sib200
from lingosteer.files import write_text_atomic
from lingosteer.languages import normalize_code
from lingosteer.markdown import markdown_table
from lingosteer.stats import bootstrap_delta_ci, bootstrap_mean_ci
from matrix.artifact import InterferenceMatrix, load_interference
from matrix.jsonio import write_json_atomic
from matrix.plots import downstream_plot
from matrix.sweep import SweepConfig, SweepOutcome, load_encoder, load_records, run_id, run_sweep
from training.config import load_training_config
from training.corpus import SPECIAL_ROLES, compact_ids, load_tokenizer, tokenize

FORMAT = "lingosteer.downstream"
FORMAT_VERSION = 1
DEFAULT_MATRIX = config_path("interference", "interference.json")
DEFAULT_TRAINING = config_path("training", "cpu.yaml")
# Low-resource languages of the 12-language matrix in three scripts (Latin, Cyrillic, Arabic).
DEFAULT_TARGETS = ("hau_Latn", "bel_Cyrl", "urd_Arab")
PARTNERS_PER_SIDE = 2
SMALLEST_EFFECT = 0.01  # accuracy (1 point): the smallest harm we would call the paper's effect
CONFIDENCE = 0.95
RESAMPLES = 10_000
FINDINGS = ("replicated", "not replicated", "inconclusive at this scale")
DECISION_RULE = """\
1. Signal: the monolingual encoder beats its untrained initialisation (paired 95% bootstrap CI of
   mono - untrained above 0) for a majority of targets. Otherwise "inconclusive at this scale":
   pre-training adds no topic information that interference could take away.
2. "replicated" iff high avg < low avg < mono for a majority of targets, AND the pooled (mean over
   targets) high avg - low avg has a 95% CI below 0, AND over all pairs the Spearman correlation
   between I[A,B] and the accuracy drop (mono - pair) is negative (more interference, bigger drop)
   with p < 0.05.
3. "not replicated" iff the pooled high - low CI lies above -1 point (the data exclude a harm of
   1 accuracy point or more from high-interference partners; the paper's Greek example is 2.5
   points), or the Spearman correlation is positive with p < 0.05 (significantly the wrong way).
4. Otherwise "inconclusive at this scale"."""


@dataclass(frozen=True)
class TargetPlan:
    target: str
    low: tuple[str, ...]  # least interference first: largest I[target, B]
    high: tuple[str, ...]  # most interference first: most negative I[target, B]

    @property
    def runs(self) -> list[tuple[str, ...]]:
        return [(self.target,)] + [tuple(sorted((self.target, partner))) for partner in self.low + self.high]


def choose_partners(matrix: InterferenceMatrix, target: str, per_side: int = PARTNERS_PER_SIDE) -> TargetPlan:
    """The `per_side` lowest- and highest-interference partners of `target` in its row of the matrix,
    among measured entries only: the check asks whether measured interference predicts accuracy."""
    row = matrix.index(target)
    measured = [
        (float(matrix.interference[row, column]), language)
        for column, language in enumerate(matrix.languages)
        if column != row and matrix.measured[row, column]
    ]
    if per_side < 1 or len(measured) < 2 * per_side:
        raise ValueError(
            f"{target} has {len(measured)} measured partners in the matrix; {per_side} per side needs {2 * per_side}"
        )
    measured.sort(key=lambda item: (-item[0], item[1]))  # least interference first; ties by code
    low = tuple(language for _, language in measured[:per_side])
    high = tuple(language for _, language in reversed(measured[-per_side:]))
    return TargetPlan(target, low, high)


def plan_targets(
    matrix: InterferenceMatrix, targets: list[str], per_side: int = PARTNERS_PER_SIDE, data_dir=None
) -> list[TargetPlan]:
    """Partners of each target; every target must be in the matrix and have SIB-200 train and test splits."""

    codes = list(dict.fromkeys(normalize_code(code) for code in targets))
    if not codes:
        raise ValueError("no target languages given")
    for code in codes:
        load_sib200(code, splits=("train", "test"), data_dir=data_dir)  # a clear error before any training
    return [choose_partners(matrix, code, per_side) for code in codes]


def train_encoders(
    plans: list[TargetPlan], config: SweepConfig, results: Path, address: str | None = None, num_cpus: int = 2,
    max_retries: int = 2, progress: bool = True,
) -> SweepOutcome:
    """The targets' monolingual and pair encoders through the sweep's Ray runner; finished runs are reused."""
    runs = [run for plan in plans for run in plan.runs]
    return run_sweep(
        config, results, address, num_cpus=num_cpus, max_retries=max_retries, progress=progress, runs=runs,
        save_encoders=True,
    )


def mean_pooled_embeddings(model, sentences: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """[sentences, hidden]: the encoder's final hidden states averaged over each sentence's tokens."""
    import torch

    from training.train import pad_batch  # local: loads torch, which `lingosteer --help` must not pay for

    chunks = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = pad_batch(sentences[start : start + batch_size], model.pad_id)
            real = (batch != model.pad_id).unsqueeze(-1).float()
            chunks.append(((model.encode(batch) * real).sum(dim=1) / real.sum(dim=1)).numpy())
    return np.concatenate(chunks)


def topic_correctness(
    train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], seed: int = 0
) -> np.ndarray:
    """Per test item, whether a logistic regression fitted on (train_x, train_y) labels it right."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y)) < 2:
        raise ValueError(f"the training split has {len(set(train_y))} topic label(s); classification needs 2 or more")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(train_x, train_y)
    return classifier.predict(test_x) == np.asarray(test_y)


def accuracy_with_ci(correct: np.ndarray, seed: int = 0) -> dict:
    """Accuracy and its percentile bootstrap CI over test items."""
    values = np.asarray(correct, float)
    low, high = bootstrap_mean_ci([values], resamples=RESAMPLES, seed=seed, level=CONFIDENCE)
    return {"accuracy": float(values.mean()), "ci": [low, high]}


def paired_difference(baseline: list[np.ndarray], other: list[np.ndarray], seed: int = 0) -> dict:
    """Mean over targets of acc(other) - acc(baseline), with a CI resampling items within each target."""

    pairs = [(np.asarray(b, float), np.asarray(o, float)) for b, o in zip(baseline, other)]
    delta = float(np.mean([o.mean() - b.mean() for b, o in pairs]))
    low, high = bootstrap_delta_ci(pairs, resamples=RESAMPLES, seed=seed, level=CONFIDENCE)
    return {"delta": delta, "ci": [low, high]}


def _sib_items(language: str, split: str, data_dir) -> tuple[list[str], list[str]]:

    rows = load_sib200(language, splits=(split,), data_dir=data_dir)
    return [row.text for row in rows], [row.category for row in rows]


def evaluate_targets(
    plans: list[TargetPlan], matrix: InterferenceMatrix, config: SweepConfig, results: Path, progress: bool = True,
) -> list[dict]:
    """Per target: the untrained, monolingual and partner encoders' topic accuracy on A's SIB-200 test split."""
    import torch
    from tqdm import tqdm

    from training.model import MaskedLMEncoder  # local: loads torch (see above)

    tokenizer = load_tokenizer(config.tokenizer)
    bar = tqdm(total=sum(2 + len(p.low) + len(p.high) for p in plans), desc="downstream evaluation", unit="model",
               disable=not progress)
    evaluated = []
    for plan in plans:
        mono, vocabulary = load_encoder(results, run_id((plan.target,)))
        torch.manual_seed(config.seed)  # as train_run does: the initialisation every run started from
        untrained = MaskedLMEncoder(config.training, len(vocabulary), SPECIAL_ROLES.index("pad"), "sdpa").eval()
        (train_text, train_y), (test_text, test_y) = (
            _sib_items(plan.target, split, config.data_dir) for split in ("train", "test")
        )
        train_ids, test_ids = (
            compact_ids(tokenize(tokenizer, texts, config.training.max_length), vocabulary)
            for texts in (train_text, test_text)
        )

        def correctness(model) -> np.ndarray:
            bar.update(1)
            return topic_correctness(
                mean_pooled_embeddings(model, train_ids), train_y, mean_pooled_embeddings(model, test_ids), test_y,
                config.seed,
            )

        partners = {}
        for partner in plan.low + plan.high:
            model, partner_vocabulary = load_encoder(results, run_id((plan.target, partner)))
            if not np.array_equal(partner_vocabulary, vocabulary):
                raise ValueError(f"{results}: the encoders of {plan.target} and {plan.target}+{partner} differ "
                                 "in vocabulary; they are not from one sweep corpus")
            partners[partner] = correctness(model)
        evaluated.append({
            "plan": plan,
            "untrained": correctness(untrained),
            "mono": correctness(mono),
            "partners": partners,
            "interference": {b: float(matrix.interference[matrix.index(plan.target), matrix.index(b)])
                             for b in partners},
            "majority_class_rate": max(test_y.count(label) for label in set(test_y)) / len(test_y),
        })
    bar.close()
    return evaluated


def summarise(evaluated: list[dict], seed: int = 0) -> dict:
    """Table 1 per target, pooled high - low and pair - mono differences, the rank correlation, the finding."""
    from scipy.stats import spearmanr

    targets, points, items = [], [], {"low": [], "high": [], "mono": [], "pairs": []}
    for entry in evaluated:
        plan, partners, mono = entry["plan"], entry["partners"], entry["mono"]
        # Per test item: the share of the side's models that label it right.
        low = np.mean([partners[b] for b in plan.low], axis=0)
        high = np.mean([partners[b] for b in plan.high], axis=0)
        pairs = np.mean(list(partners.values()), axis=0)
        for side, values in (("low", low), ("high", high), ("mono", mono), ("pairs", pairs)):
            items[side].append(values)
        points += [{"target": plan.target, "partner": b, "interference": entry["interference"][b],
                    "drop": float(mono.mean() - correct.mean())} for b, correct in partners.items()]

        def partner_rows(side: tuple[str, ...]) -> list[dict]:
            return [{"partner": b, "interference": entry["interference"][b], **accuracy_with_ci(partners[b], seed)}
                    for b in side]

        targets.append({
            "target": plan.target,
            "test_items": len(mono),
            "majority_class_rate": entry["majority_class_rate"],
            "untrained": accuracy_with_ci(entry["untrained"], seed),
            "mono": accuracy_with_ci(mono, seed),
            "low": partner_rows(plan.low),
            "high": partner_rows(plan.high),
            "low_avg": float(low.mean()),
            "high_avg": float(high.mean()),
            "high_minus_low": paired_difference([low], [high], seed),
            "mono_minus_untrained": paired_difference([entry["untrained"]], [mono], seed),
            "ordering_holds": bool(high.mean() < low.mean() < mono.mean()),
        })
    rho, p = float("nan"), float("nan")
    if len(points) > 2:
        rho, p = spearmanr([q["interference"] for q in points], [q["drop"] for q in points])
    summary = {
        "targets": targets,
        "pooled": {
            "high_minus_low": paired_difference(items["low"], items["high"], seed),
            "pairs_minus_mono": paired_difference(items["mono"], items["pairs"], seed),
        },
        "correlation": {"method": "spearman", "x": "I[A,B]", "y": "accuracy drop: mono - pair",
                        "pairs": len(points), "rho": float(rho), "p": float(p), "points": points},
    }
    summary["finding"], summary["reasons"] = decide(summary)
    return summary


def decide(summary: dict) -> tuple[str, list[str]]:
    """The finding by the rule in the module docstring (written before any result existed)."""
    targets, majority = summary["targets"], len(summary["targets"]) // 2 + 1
    signal = sum(t["mono_minus_untrained"]["ci"][0] > 0 for t in targets)
    ordered = sum(t["ordering_holds"] for t in targets)
    low_ci, high_ci = summary["pooled"]["high_minus_low"]["ci"]
    rho, p = summary["correlation"]["rho"], summary["correlation"]["p"]
    significant = np.isfinite(p) and p < 0.05
    reasons = [
        f"mono beats its untrained initialisation (CI above 0) for {signal} of {len(targets)} targets",
        f"high avg < low avg < mono for {ordered} of {len(targets)} targets",
        f"pooled high avg - low avg: {100 * summary['pooled']['high_minus_low']['delta']:+.1f} points, "
        f"{CONFIDENCE:.0%} CI [{100 * low_ci:+.1f}, {100 * high_ci:+.1f}]",
        f"Spearman rho(I[A,B], mono - pair) = {rho:+.2f}, p = {p:.3g} over {summary['correlation']['pairs']} pairs "
        "(the paper predicts rho < 0: more negative I, bigger drop)",
    ]
    if signal < majority:
        return "inconclusive at this scale", reasons
    if ordered >= majority and high_ci < 0 and significant and rho < 0:
        return "replicated", reasons
    if low_ci > -SMALLEST_EFFECT or (significant and rho > 0):
        return "not replicated", reasons
    return "inconclusive at this scale", reasons


def matrix_reproduction(plans: list[TargetPlan], matrix: InterferenceMatrix, results: Path) -> dict:
    """Largest relative difference between the encoders' MLM losses and the matrix's L entries (0: the same
    models)."""

    wanted = {run_id(run) for plan in plans for run in plan.runs}
    differences = []
    for record in load_records(results)[1]:
        if record["run_id"] not in wanted:
            continue
        for language, loss in record["loss"].items():
            other = next((b for b in record["languages"] if b != language), language)
            reference = matrix.loss[matrix.index(language), matrix.index(other)]
            if np.isfinite(reference):
                differences.append(abs(loss - reference) / reference)
    return {"losses_compared": len(differences), "max_relative_difference": max(differences, default=float("nan"))}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _with_ci(entry: dict) -> str:
    low, high = entry["ci"]
    return f"{_percent(entry['accuracy'])} [{_percent(low)}, {_percent(high)}]"


def _delta(entry: dict) -> str:
    low, high = entry["ci"]
    return f"{100 * entry['delta']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown_summary(report: dict) -> str:

    summary, per_side = report["summary"], len(report["summary"]["targets"][0]["low"])
    header = ["target", "majority class", "untrained", "mono"]
    header += [f"low {i + 1}" for i in range(per_side)] + [f"high {i + 1}" for i in range(per_side)]
    header += ["low avg", "high avg", "high - low [CI]"]
    rows = []
    for target in summary["targets"]:
        partners = [f"{row['partner']} (I {row['interference']:+.3f}): {_with_ci(row)}"
                    for row in target["low"] + target["high"]]
        rows.append([target["target"], _percent(target["majority_class_rate"]), _with_ci(target["untrained"]),
                     _with_ci(target["mono"]), *partners, _percent(target["low_avg"]), _percent(target["high_avg"]),
                     _delta(target["high_minus_low"])])
    correlation, pooled = summary["correlation"], summary["pooled"]
    points = markdown_table(
        ["target", "partner", "I[A,B]", "drop (mono - pair, points)"],
        [[q["target"], q["partner"], f"{q['interference']:+.3f}", f"{100 * q['drop']:+.1f}"]
         for q in correlation["points"]],
    )
    reproduction = report["matrix_reproduction"]
    lines = [
        "# Does interference predict downstream accuracy? SIB-200 topic classification",
        "",
        f"Finding: **{summary['finding']}**.",
        "",
        *[f"- {reason}" for reason in summary["reasons"]],
        "",
        "## Table 1 (accuracy %, 95% bootstrap CI over test items)",
        "",
        "Partners: low = least interference (largest I[A,B]), high = most (most negative I[A,B]). "
        "Averages and differences are over the same test items (paired).",
        "",
        markdown_table(header, rows),
        "",
        f"Pooled over targets: high avg - low avg {_delta(pooled['high_minus_low'])} points; "
        f"pair - mono {_delta(pooled['pairs_minus_mono'])} points.",
        "",
        f"## Interference vs accuracy drop over {correlation['pairs']} pairs",
        "",
        f"Spearman rho = {correlation['rho']:+.3f}, p = {correlation['p']:.3g}.",
        "",
        points,
        "",
        "## Protocol",
        "",
        f"- Matrix: `{report['matrix']}`; encoders: `{report['results']}` (sweep seed {report['seed']}, "
        f"training recipe `{report['training']}`).",
        f"- MLM losses of these encoders vs the matrix's entries: {reproduction['losses_compared']} compared, "
        f"largest relative difference {reproduction['max_relative_difference']:.2g} (0: the matrix's own models).",
        "- Embeddings: final hidden states mean-pooled over each sentence's tokens, frozen encoder; classifier: "
        "scikit-learn logistic regression on standardised embeddings, fitted on SIB-200 `train`, scored on `test`; "
        "untrained = the initialisation every run starts from.",
        "",
        "## Decision rule (fixed before the results)",
        "",
        DECISION_RULE,
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> list[Path]:
    """downstream.json, summary.md and downstream.png in `out`."""

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "downstream.json", out / "summary.md", out / "downstream.png"]
    write_json_atomic(paths[0], report)
    write_text_atomic(paths[1], markdown_summary(report))
    downstream_plot(report["summary"], paths[2])
    return paths


def run_downstream(
    matrix_path: Path, targets: list[str], training_path: Path, results: Path, out: Path, data_dir=None,
    seed: int = 0, tokenizer: str | None = None, per_side: int = PARTNERS_PER_SIDE, address: str | None = None,
    num_cpus: int = 2, max_retries: int = 2, progress: bool = True,
) -> tuple[SweepOutcome, list[Path]]:
    """Train what is missing, evaluate, write the report; nothing is written to `out` if a run failed."""

    matrix = load_interference(matrix_path)
    plans = plan_targets(matrix, targets, per_side, data_dir)
    config = SweepConfig(
        languages=matrix.languages, training=load_training_config(training_path), seed=seed, tokenizer=tokenizer,
        data_dir=None if data_dir is None else str(data_dir), source=f"sweep downstream of {matrix_path}",
    )
    outcome = train_encoders(plans, config, results, address, num_cpus, max_retries, progress)
    if outcome.failed:
        return outcome, []
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "matrix": _shown(matrix_path),
        "results": _shown(results),
        "training": _shown(training_path),
        "seed": seed,
        "plans": [{"target": p.target, "low": list(p.low), "high": list(p.high)} for p in plans],
        "matrix_reproduction": matrix_reproduction(plans, matrix, results),
        "summary": summarise(evaluate_targets(plans, matrix, config, results, progress), seed),
        "decision_rule": DECISION_RULE,
    }
    return outcome, write_report(report, out)


def _shown(path) -> str:
    """A path as the report shows it: relative to the working directory when inside it (reports are
    committed to docs/; an absolute path would name one machine's checkout)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
