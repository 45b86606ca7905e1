"""Which form to serve: what low rank costs in quality against the full map.

    flock /tmp/heavy.lock python bench/lowrank_quality.py --out reports/lowrank-quality [--json]

Per language (XCOPA languages that NTREX-128 has too; default sw, tr, th, zh), aligned toward
English on Gemma 3 270M:

- fit: the recommended recipe (alignment.recipe.RECOMMENDED: ridge toward the identity, mean
  pooling, every layer, SIB-200 train+dev + NTREX lines 0-299) once as the full map, and with
  `rank=r` for each r of --ranks (default 16, 32, 64, 128). All forms share one set of
  sufficient statistics (`LinearAligner.merge`), so they see the same pairs and pick the same
  lambdas; a rank-r map is the full ridge's delta W - I truncated to rank r.
- retrieval P@1 on NTREX pairs never fitted on: --eval-pairs (300) line indices drawn with
  --seed (0) from the NTREX lines outside the fit data's NTREX ranges that share no sentence
  with any fit pair (one index set for every language; the indices are in the output). Raw
  states, source -> English after mapping (alpha 1), per layer; the figure is the mean over the
  map's layers, with a 95% bootstrap CI over sentences (`lingosteer.stats`) and the paired CI of
  its drop against the full map. The P@1 at the full map's best layer is reported beside it.
- XCOPA: the first --xcopa-items items of each language's validation file (`val.<code>.jsonl`;
  never a test split), scored plain and under every form through one vLLM engine
  (`evaluation.runner.Scorer`: maps loaded with the plugin's `lingosteer_load`, one form's maps
  at a time), each form at the fitted artifact's serving defaults (alpha, layers, positions;
  `--alpha` / `--positions` override them). Per form: the share of items whose chosen option
  differs from the full map's choice and from plain's, with 95% bootstrap CIs, and accuracy
  (reported only, never used to choose).

SELECTION_RULE (written, here and in docs/alignment.md, "Serving form: low rank vs full",
before the study was first run and before any of its results were seen):

    The default serving form is rank r, the smallest r in {16, 32, 64, 128} for which, averaged
    over the languages, (a) retrieval P@1 on the held-out NTREX pairs (raw states, source ->
    English after mapping, mean over the map's layers) is at most 1 point (0.01) below the full
    map's, and (b) the share of XCOPA validation items whose chosen option differs from the full
    map's choice (both at the fitted artifact's serving alpha, layers and positions) is at most
    2%. Point estimates decide; the 95% CIs are reported, not used. If no rank passes, the
    default serving form stays full. XCOPA accuracy is reported only, never used to choose.

Outputs: `--out DIR` gets lowrank.json (what --json prints: one object), lowrank.md (the tables)
and lowrank.png (P@1 and XCOPA choice changes against rank, per language). The artifacts are
written to a temporary directory (`--keep-artifacts`: to DIR/artifacts/<form>/<language>).
Time here (2 cores, float32, from a trial's rates): ~45 s of English states, per language ~75 s
of states, ~20 s of fits and retrieval and ~50 s of XCOPA scoring, plus the engine's start (5-60 s):
~11 minutes for four languages on an idle machine, more on a shared one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from alignment.artifact import load_intervention
from alignment.estimator import LinearAligner
from alignment.evaluate import retrieval_hits
from alignment.fitting import recipe_pairs, write_fit
from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from alignment.recipe import RECOMMENDED, Recipe
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.data import parallel_ntrex, parse_parallel_source
from lingosteer.files import write_text_atomic
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import get_language, normalize_code
from lingosteer.markdown import markdown_table
from lingosteer.models import resolve_model
from lingosteer.stats import bootstrap_delta_ci, bootstrap_mean_ci

LANGUAGES = "sw,tr,th,zh"  # XCOPA languages with NTREX data: Latin low- and mid-resource, Thai, Han
RANKS = (16, 32, 64, 128)
FULL = "full"
TARGET = "eng_Latn"

# The rule, fixed before the first run (see the module docstring and docs/alignment.md).
P1_DROP_MAX = 0.01  # 1 point of P@1, mean over languages
CHOICE_CHANGE_MAX = 0.02  # 2% of XCOPA items, mean over languages
SELECTION_RULE = (
    "The default serving form is rank r, the smallest r in {16, 32, 64, 128} for which, averaged over the "
    "languages, (a) retrieval P@1 on the held-out NTREX pairs (raw states, source -> English after mapping, mean "
    "over the map's layers) is at most 1 point (0.01) below the full map's, and (b) the share of XCOPA validation "
    "items whose chosen option differs from the full map's choice (both at the fitted artifact's serving alpha, "
    "layers and positions) is at most 2%. Point estimates decide; the 95% CIs are reported, not used. If no rank "
    "passes, the default serving form stays full. XCOPA accuracy is reported only, never used to choose."
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--langs", default=LANGUAGES, help="XCOPA language codes with NTREX data, comma-separated")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="ranks compared with the full map")
    parser.add_argument("--fit-data", nargs="+", default=list(RECOMMENDED.data),
                        help="parallel sources of the fit (default: the recommended recipe's)")
    parser.add_argument("--eval-pairs", type=int, default=300, help="held-out NTREX pairs for retrieval")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out NTREX lines and the bootstrap")
    parser.add_argument("--xcopa-items", type=int, default=100, help="the first N XCOPA validation items")
    parser.add_argument("--alpha", type=float, default=None, help="steer XCOPA at this alpha (default: the "
                                                                   "artifact's serving alpha)")
    parser.add_argument("--positions", default=None, help="steer XCOPA at these positions (default: the "
                                                          "artifact's serving positions)")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of every CI")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per forward pass of extraction")
    parser.add_argument("--data-dir", type=Path, default=None, help="root holding sib200/, ntrex128/ and xcopa/")
    parser.add_argument("--out", type=Path, default=Path("reports/lowrank-quality"))
    parser.add_argument("--keep-artifacts", action="store_true", help="write the maps to OUT/artifacts")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def parse_ranks(text: str, hidden_size: int) -> list[int]:
    ranks = sorted({int(r) for r in text.split(",") if r.strip()})
    if not ranks or ranks[0] < 1 or ranks[-1] > hidden_size:
        raise ValueError(f"--ranks must be ranks from 1 to the hidden size {hidden_size}, got {text!r}")
    return ranks


def form_name(rank: int | None) -> str:
    return FULL if rank is None else str(rank)


# ---- the data -----------------------------------------------------------------------


def fit_recipe(specs: list[str], data_dir: Path | None) -> Recipe:
    """The recommended recipe on `specs` (each given `@data_dir` unless it names its own directory)."""
    specs = [spec if "@" in spec or data_dir is None else f"{spec}@{data_dir}" for spec in specs]
    if any(parse_parallel_source(spec).corpus == "xcopa" for spec in specs):
        raise ValueError("XCOPA items are this study's test domain: they cannot be fitted on")
    return dataclasses.replace(RECOMMENDED, data=tuple(specs))


def heldout_ntrex(recipe: Recipe, fit_pairs: dict[str, list], eval_pairs: int, seed: int,
                  data_dir: Path | None, exclude: np.ndarray | None = None) -> dict:
    """The held-out NTREX split, one index set for every language: `eval_pairs` lines drawn with `seed` from
    the lines outside every NTREX range of the fit data whose source and English sentences are in no fit pair
    (and, given `exclude`, a bool mask over the lines, outside the lines it marks)."""
    ntrex = {flores: parallel_ntrex(flores, TARGET, data_dir) for flores in fit_pairs}
    lines = len(next(iter(ntrex.values())))
    if any(len(pairs) != lines for pairs in ntrex.values()):
        raise ValueError("NTREX files of the languages differ in length")
    fitted = np.zeros(lines, dtype=bool)
    for spec in recipe.data:
        source = parse_parallel_source(spec)
        if source.corpus == "ntrex":
            first, last = source.lines or (0, lines - 1)
            fitted[first : last + 1] = True
    for flores, pairs in fit_pairs.items():
        seen = {text for pair in pairs for text in pair}
        fitted |= np.array([src in seen or eng in seen for src, eng in ntrex[flores]])
    if exclude is not None:
        fitted |= exclude
    pool = np.flatnonzero(~fitted)
    if len(pool) < eval_pairs:
        raise ValueError(f"only {len(pool)} NTREX lines were not fitted on; --eval-pairs asks for {eval_pairs}")
    indices = np.sort(np.random.default_rng(seed).choice(pool, size=eval_pairs, replace=False))
    return {"indices": indices, "pool_size": int(len(pool)),
            "pairs": {flores: [pairs[i] for i in indices] for flores, pairs in ntrex.items()}}


class EnglishStates:
    """Pooled states of English sentences, each extracted once for every language that needs it."""

    def __init__(self, extract, sentences: list[str]):
        unique = list(dict.fromkeys(sentences))
        self.row = {text: i for i, text in enumerate(unique)}
        self.states = extract(unique)

    def __call__(self, sentences: list[str]) -> np.ndarray:
        return self.states[:, [self.row[text] for text in sentences]]


# ---- fits and retrieval ---------------------------------------------------------------


def fit_forms(recipe: Recipe, X: np.ndarray, Y: np.ndarray, ranks: list[int]) -> dict[str, LinearAligner]:
    """{form: solved aligner}: the full map and one per rank, all from one set of statistics (the sample
    ids of a single-process fit, `alignment.fitting.fit_statistics`)."""
    statistics = LinearAligner(holdout_fraction=recipe.holdout_fraction).partial_fit(
        X, Y, sample_ids=np.arange(X.shape[1]))
    return {form_name(rank): dataclasses.replace(recipe, rank=rank).aligner().merge(statistics).solve()
            for rank in [None, *ranks]}


def retrieval(aligner: LinearAligner, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Hits [layers, pairs]: is each mapped source sentence's nearest English sentence its translation?"""
    return np.stack([retrieval_hits(aligner.transform(X[i], layer=i), Y[i]) for i in range(X.shape[0])])


# ---- XCOPA ----------------------------------------------------------------------------


def xcopa_scores(model_dir: Path, artifacts: Path, forms: list[str], codes: list[str], xcopa_dir: Path,
                  items: int, alpha: float | None, positions: str | None) -> dict:
    """Plain and every form's option log-likelihoods [items, options] on the XCOPA validation items, through
    one engine."""
    from transformers import AutoTokenizer

    from evaluation.runner import BenchmarkConfig, Scorer, Timing, engine_facts, load_language_sets, \
        start_scoring_engine
    from evaluation.scoring import PLAIN, served_condition
    from evaluation.tasks import XCOPA, load_prompts
    from intervene_engine.request_spec import InterventionRequest
    from lingosteer.backend import shutdown_engine

    paths = [xcopa_dir / f"val.{code}.jsonl" for code in codes]  # the validation split, never test
    config = BenchmarkConfig(task=XCOPA, model=model_dir, eval_paths=paths, max_items=items, progress=False)
    sets = load_language_sets(config, paths, AutoTokenizer.from_pretrained(model_dir), load_prompts(XCOPA))
    map_sets = [{normalize_code(code): artifacts / form / normalize_code(code) for code in codes} for form in forms]
    conditions = {}
    for code, s in sets.items():
        serving = load_intervention(map_sets[0][s.flores]).serving
        conditions[code] = served_condition(InterventionRequest(s.flores, alpha=alpha, positions=positions), serving)
        if conditions[code] == PLAIN:
            raise ValueError(f"{code}: the serving alpha is 0 (off): every form would be the plain run; give --alpha")
    start = time.perf_counter()
    llm = start_scoring_engine(model_dir, "float32", enforce_eager=True)  # compile does not pay back on XCOPA
    engine_seconds = time.perf_counter() - start
    try:
        timing = Timing()
        scorer = Scorer(llm, map_sets, timing, progress=False)
        everything = {code: np.arange(s.n) for code, s in sets.items()}
        scorer.score([(s, PLAIN, everything[code]) for code, s in sets.items()], maps=0)
        for maps, form in enumerate(forms):
            scorer.score([(s, conditions[code], everything[code]) for code, s in sets.items()], maps)
            log(f"XCOPA: {form} scored ({timing.seconds:.0f} s of scoring so far)")
        facts = engine_facts(llm)
    finally:
        shutdown_engine(llm)
    return {
        "labels": {code: s.labels for code, s in sets.items()},
        "plain": {code: scorer.scores(s, PLAIN, 0) for code, s in sets.items()},
        "forms": {form: {code: scorer.scores(s, conditions[code], maps) for code, s in sets.items()}
                  for maps, form in enumerate(forms)},
        "serving": {code: {"alpha": c.alpha, "layers": None if c.layers is None else list(c.layers),
                           "positions": c.steer} for code, c in conditions.items()},
        "files": {code: str(s.path) for code, s in sets.items()},
        "engine": facts, "engine_start_seconds": engine_seconds, "scoring_seconds": timing.seconds,
    }


# ---- summary and the rule ---------------------------------------------------------------


def summarise(hits: dict, xcopa: dict, forms: list[str], codes: list[str], resamples: int, seed: int) -> tuple:
    """(per language {form: figures}, the mean over languages {form: figures}).

    `hits[code][form]`: retrieval hits [layers, pairs]; a sentence's figure is its mean over layers.
    `xcopa`: what `xcopa_scores` returns; an item's choice is its option of highest log-likelihood."""

    def ci(samples):
        return list(bootstrap_mean_ci(samples, resamples, seed))

    def delta_ci(pairs):
        return list(bootstrap_delta_ci(pairs, resamples, seed))

    per_query = {code: {form: hits[code][form].mean(axis=0) for form in forms} for code in codes}
    labels, plain = xcopa["labels"], {code: scores.argmax(axis=1) for code, scores in xcopa["plain"].items()}
    choices = {form: {code: scores.argmax(axis=1) for code, scores in by_code.items()}
               for form, by_code in xcopa["forms"].items()}
    scores = xcopa["forms"]
    changed_full = {code: {form: (choices[form][code] != choices[FULL][code]).astype(float) for form in forms}
                    for code in codes}
    changed_plain = {code: {form: (choices[form][code] != plain[code]).astype(float) for form in forms}
                     for code in codes}
    correct = {code: {form: (choices[form][code] == labels[code]).astype(float) for form in forms} for code in codes}

    def figures(langs: list[str], form: str) -> dict:
        # P@1 drop against the full map: mean(full - form), paired by sentence.
        drop_pairs = [(per_query[c][form], per_query[c][FULL]) for c in langs]
        return {
            "p1": float(np.mean([per_query[c][form].mean() for c in langs])),
            "p1_ci95": ci([per_query[c][form] for c in langs]),
            "p1_drop_vs_full": float(np.mean([(b - a).mean() for a, b in drop_pairs])),
            "p1_drop_vs_full_ci95": delta_ci(drop_pairs),
            "choice_change_vs_full": float(np.mean([changed_full[c][form].mean() for c in langs])),
            "choice_change_vs_full_ci95": ci([changed_full[c][form] for c in langs]),
            "choice_change_vs_plain": float(np.mean([changed_plain[c][form].mean() for c in langs])),
            "choice_change_vs_plain_ci95": ci([changed_plain[c][form] for c in langs]),
            "accuracy": float(np.mean([correct[c][form].mean() for c in langs])),
            "accuracy_ci95": ci([correct[c][form] for c in langs]),
            # How far steering moved the options' log-likelihoods: from plain (did it act at all?) and
            # from the full map's (how close the form's steering is to the full map's).
            "loglik_mean_abs_change_vs_plain": float(np.mean(
                [np.abs(scores[form][c] - xcopa["plain"][c]).mean() for c in langs])),
            "loglik_max_abs_diff_vs_full": float(max(np.abs(scores[form][c] - scores[FULL][c]).max() for c in langs)),
        }

    per_language = {code: {form: figures([code], form) for form in forms} for code in codes}
    for code in codes:
        layer_p1 = {form: hits[code][form].mean(axis=1) for form in forms}
        best = int(np.argmax(layer_p1[FULL]))
        for form in forms:
            per_language[code][form].update({"p1_per_layer": layer_p1[form].tolist(),
                                             "p1_at_full_best_layer": float(layer_p1[form][best])})
    return per_language, {form: figures(codes, form) for form in forms}


def apply_rule(mean: dict, ranks: list[int]) -> dict:
    """SELECTION_RULE on the means over languages."""
    per_rank = {}
    for rank in ranks:
        m = mean[form_name(rank)]
        passes_p1 = m["p1_drop_vs_full"] <= P1_DROP_MAX
        passes_choices = m["choice_change_vs_full"] <= CHOICE_CHANGE_MAX
        per_rank[form_name(rank)] = {"p1_drop_vs_full": m["p1_drop_vs_full"],
                                     "choice_change_vs_full": m["choice_change_vs_full"],
                                     "passes_p1": passes_p1, "passes_choices": passes_choices,
                                     "passes": passes_p1 and passes_choices}
    chosen = next((rank for rank in ranks if per_rank[form_name(rank)]["passes"]), None)
    return {"serving_form": FULL if chosen is None else f"rank {chosen}", "rank": chosen,
            "ranks_checked": ranks, "rule_ranks": list(RANKS), "per_rank": per_rank}


# ---- reports ----------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _interval(low_high: list[float], scale: float = 100, sign: str = "", digits: int = 1) -> str:
    return f"[{scale * low_high[0]:{sign}.{digits}f}, {scale * low_high[1]:{sign}.{digits}f}]"


def _loads(load_average: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in load_average)


def markdown(report: dict) -> str:
    forms, codes, mean, decision = report["forms"], report["languages"], report["mean"], report["decision"]
    passes = {form: ("yes" if row["passes"] else "no") for form, row in decision["per_rank"].items()}

    def p1(row: dict) -> str:
        return f"{row['p1']:.3f} {_interval(row['p1_ci95'], 1, digits=3)}"

    def changed(row: dict) -> str:
        return f"{_pct(row['choice_change_vs_full'])} {_interval(row['choice_change_vs_full_ci95'])}"

    rows = [[form, f"{report['parameter_bytes'][form]:,}", p1(m),
             f"{100 * m['p1_drop_vs_full']:+.1f} {_interval(m['p1_drop_vs_full_ci95'], sign='+')}", changed(m),
             f"{_pct(m['choice_change_vs_plain'])} {_interval(m['choice_change_vs_plain_ci95'])}",
             _pct(m["accuracy"]), passes.get(form, "(reference)")] for form in forms for m in [mean[form]]]
    header = ["form", "bytes (all layers)", "P@1 [95% CI]", "P@1 drop vs full, pts [CI]",
              "choice change vs full, % [CI]", "vs plain, %", "XCOPA acc. %", "passes the rule"]
    per_language = [[code, form, p1(r), f"{r['p1_at_full_best_layer']:.3f}", changed(r),
                     _pct(r["choice_change_vs_plain"]), _pct(r["accuracy"])]
                    for code in codes for form in forms for r in [report["results"][code]["forms"][form]]]
    language_header = ["language", "form", "P@1 [95% CI]", "P@1 best layer", "change vs full, % [CI]",
                       "vs plain, %", "acc. %"]
    split, load = report["ntrex_split"], report["load_average"]
    return (
        f"# Serving form: low rank vs full ({report['model']}, {', '.join(codes)} -> English)\n\n"
        f"Retrieval: {split['eval_pairs']} NTREX pairs never fitted on (seed {split['seed']}, from "
        f"{split['pool_size']} lines outside the fit), raw P@1 source -> English after mapping, mean over "
        f"{len(report['layers'])} layers. XCOPA: {report['xcopa']['items']} validation items per language at the "
        f"artifacts' serving defaults; plain accuracy {_pct(report['xcopa']['plain_accuracy'])}%. "
        f"Means over languages:\n\n{markdown_table(header, rows)}\n\n"
        f"Per language (P@1 also at the full map's best layer):\n\n{markdown_table(language_header, per_language)}"
        f"\n\nRule (fixed before the first run): {report['selection_rule']}\n\n"
        f"**Decision: {decision['serving_form']}** "
        f"(ranks checked: {', '.join(map(str, decision['ranks_checked']))}).\n\n"
        f"{report['wall_seconds']:.0f} s wall, load average {_loads(load['start'])} at start, "
        f"{_loads(load['end'])} at the end.\n"
    )


def plot(report: dict, path: Path) -> None:
    """P@1 (mean over layers) and XCOPA choice changes against the full map, per form and language."""
    from lingosteer.figures import pyplot, save_figure

    plt = pyplot()
    forms, codes = [*report["forms"][1:], FULL], report["languages"]  # rank ascending, the full map last
    x = np.arange(len(forms))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax, ylabel in (("p1", axes[0], "NTREX P@1 (held out), mean over layers"),
                            ("choice_change_vs_full", axes[1], "XCOPA items whose choice differs from full")):
        for code in codes:
            ax.plot(x, [report["results"][code]["forms"][form][key] for form in forms], marker="o", markersize=3,
                    label=code)
        ax.plot(x, [report["mean"][form][key] for form in forms], color="black", linewidth=2, label="mean")
        ax.set_xticks(x, [f"r{form}" if form != FULL else f"full ({report['hidden_size']})" for form in forms])
        ax.set_xlabel("map form (rank of W - I)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].axhline(CHOICE_CHANGE_MAX, color="grey", linestyle="--", linewidth=1, label="rule's limit")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: low rank vs full; decision: {report['decision']['serving_form']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "lowrank.json", "markdown": out / "lowrank.md", "plot": out / "lowrank.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(report))
    plot(report, paths["plot"])
    return paths


# ---- the run ------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    wall, load_start = time.perf_counter(), os.getloadavg()
    model_dir = resolve_model(args.model)
    fingerprint = model_fingerprint(model_dir)
    ranks = parse_ranks(args.ranks, fingerprint["hidden_size"])
    forms = [FULL, *map(str, ranks)]
    codes = [code.strip() for code in args.langs.split(",") if code.strip()]
    missing = [code for code in codes if not get_language(code).ntrex]
    if missing:
        raise ValueError(f"no NTREX data for {', '.join(missing)}: pick XCOPA languages NTREX-128 has")
    recipe = fit_recipe(args.fit_data, args.data_dir)
    layers = list(recipe.layers or range(fingerprint["num_hidden_layers"]))
    recipe = dataclasses.replace(recipe, layers=tuple(layers))
    xcopa_dir = (args.data_dir or DEFAULT_DATA_DIR) / "xcopa"

    fit = {normalize_code(code): recipe_pairs(recipe, normalize_code(code), TARGET) for code in codes}
    split = heldout_ntrex(recipe, {flores: pairs for flores, (_, pairs) in fit.items()}, args.eval_pairs,
                          args.seed, args.data_dir)
    states = functools.partial(extract_hidden_states, *load_model_and_tokenizer(model_dir), layers=layers,
                               pooling=recipe.pooling, batch_size=args.batch_size, progress=False)

    phases = {}
    start = time.perf_counter()
    english = EnglishStates(states, [eng for flores, (_, pairs) in fit.items()
                                     for _, eng in pairs + split["pairs"][flores]])
    phases["english_states"] = time.perf_counter() - start
    log(f"English states: {len(english.row)} sentences in {phases['english_states']:.0f} s")

    with tempfile.TemporaryDirectory(prefix="lowrank-quality-") as scratch:
        artifacts = args.out / "artifacts" if args.keep_artifacts else Path(scratch)
        hits, parameter_bytes, results = {}, {}, {}
        for code in codes:
            start = time.perf_counter()
            flores = normalize_code(code)
            sources, pairs = fit[flores]
            held = split["pairs"][flores]
            X = states([src for src, _ in pairs + held])
            X_fit, X_eval = X[:, : len(pairs)], X[:, len(pairs):]
            Y_fit, Y_eval = english([eng for _, eng in pairs]), english([eng for _, eng in held])
            extracted = time.perf_counter() - start
            aligners = fit_forms(recipe, X_fit, Y_fit, ranks)
            hits[code] = {form: retrieval(aligner, X_eval, Y_eval) for form, aligner in aligners.items()}
            for form, aligner in aligners.items():
                write_fit(dataclasses.replace(recipe, rank=None if form == FULL else int(form)), aligner,
                          artifacts / form / flores, name=f"bench/lowrank_quality.py {form}",
                          fingerprint=fingerprint, source=flores, target=TARGET, layers=layers, sources=sources,
                          overwrite=True)
                parameter_bytes[form] = aligner.parameter_bytes()["total"]
            unmapped = np.stack([retrieval_hits(X_eval[i], Y_eval[i]) for i in range(len(layers))])
            results[code] = {"flores": flores, "fit_pairs": len(pairs), "p1_unmapped": float(unmapped.mean()),
                             "lambdas": aligners[FULL].lambdas_.tolist(),
                             "best_layer_of_full": int(np.argmax(hits[code][FULL].mean(axis=1)))}
            phases[f"{code}_states"], phases[f"{code}_fits"] = extracted, time.perf_counter() - start - extracted
            log(f"{code}: {len(pairs)} fit pairs, states {extracted:.0f} s, {len(forms)} fits + retrieval "
                f"{phases[f'{code}_fits']:.0f} s; P@1 " + ", ".join(f"{form} {hits[code][form].mean():.3f}"
                                                                    for form in forms))
            del X, X_fit, X_eval
        del states, english
        gc.collect()  # the extraction model leaves before the engine comes

        xcopa = xcopa_scores(model_dir, artifacts, forms, codes, xcopa_dir, args.xcopa_items, args.alpha,
                             args.positions)
    phases["engine_start"], phases["xcopa_scoring"] = xcopa["engine_start_seconds"], xcopa["scoring_seconds"]

    per_language, mean = summarise(hits, xcopa, forms, codes, args.bootstrap, args.seed)
    for code in codes:
        results[code]["forms"] = per_language[code]
        results[code]["plain_accuracy"] = float(np.mean(xcopa["plain"][code].argmax(axis=1)
                                                        == xcopa["labels"][code]))
    report = {
        "model": str(args.model), "hidden_size": fingerprint["hidden_size"], "layers": layers,
        "languages": codes, "ranks": ranks, "forms": forms,
        "recipe": {"solver": recipe.solver, "pooling": recipe.pooling, "data": list(recipe.data),
                   "holdout_fraction": recipe.holdout_fraction},
        "ntrex_split": {"corpus": "ntrex128", "eval_pairs": args.eval_pairs, "seed": args.seed,
                        "pool": "NTREX lines outside the fit data's NTREX ranges sharing no sentence with a fit pair",
                        "pool_size": split["pool_size"], "indices": split["indices"].tolist()},
        "xcopa": {"split": "validation", "items": args.xcopa_items, "files": xcopa["files"],
                  "serving": xcopa["serving"],
                  "plain_accuracy": float(np.mean([results[c]["plain_accuracy"] for c in codes]))},
        "results": results, "mean": mean, "parameter_bytes": parameter_bytes,
        "selection_rule": SELECTION_RULE,
        "thresholds": {"p1_drop_max": P1_DROP_MAX, "choice_change_max": CHOICE_CHANGE_MAX},
        "decision": apply_rule(mean, ranks),
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "sentence (P@1), item (XCOPA)"},
        "engine": xcopa["engine"], "phase_seconds": phases,
        "wall_seconds": time.perf_counter() - wall,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    paths = write_reports(report, args.out)
    log(f"wrote {', '.join(map(str, paths.values()))}")
    print(json.dumps(report) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    from lingosteer.backend import run_offline_engines_in_process

    run_offline_engines_in_process()  # as the `lingosteer` program does: the engine runs in this process
    sys.exit(main())
