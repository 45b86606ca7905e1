"""Aligning toward the recommended high-resource language instead of English: held-out NTREX retrieval.

    .venv/bin/python bench/recommended_target.py --plan                  # the selection, no model (seconds)
    flock /tmp/heavy.lock .venv/bin/python bench/recommended_target.py --out reports/recommended-target [--json]

Issue 35, item 4. `recommend` (matrix/recommend.py, `/v1/interference/recommend`) ranks, for a
target language L, the source languages whose representations L's could be moved toward. Every
map the project serves today goes toward English. This measures one question that recommendation
should answer: for 6 served languages, does fitting L's maps toward the recommended high-resource
language R, instead of English, change retrieval P@1 on NTREX sentences never fitted on? FLORES
(SIB-200) and NTREX-128 are parallel across all their languages, so a map can be fitted toward any
target with the same source sentences.

What "the recommended high-resource language" is here. `recommend_sources(matrix, L)` ranks every
other language of the matrix by the mean of I[L, S] and I[S, L]; its unrestricted first choice can
be a Low-resource language (on the shipped matrix for 4 of the 26: Welsh for swh_Latn and tur_Latn,
Marathi for hin_Deva, Urdu for arb_Arab), which a map should not move L toward. R is the first
source it ranks when its `candidates` are the matrix's languages of NLLB resource level High
(`configs/languages.tsv`), with completed entries allowed (what the served endpoint answers by
default). The unrestricted first choice, R's basis (measured or completed), its score and English's
rank and score in the same ranking are recorded beside each language.

SELECTION_RULE (written here and in docs/sweep.md, "Aligning toward the recommended language",
before the study was first run and before any of its results were seen):

    Languages: those the project serves (an XCOPA validation file xcopa/val.<iso>.jsonl or an XNLI
    file xnli/dev.<iso>.tsv|.jsonl in the data directory) other than English and in the shipped
    matrix (configs/interference/interference.json). R = the first source recommend_sources ranks
    for L among the matrix's High-resource languages (completed entries allowed). Kept: L with
    SIB-200 train+dev and NTREX-128 data whose R is not English and has both too. Order: the margin
    of R over English in that ranking (score(R) - score(eng_Latn), rounded to 4 decimals), largest
    first, then the FLORES code; the first 6. No target: the figures are reported as measured, and
    no threshold decides anything.

On the shipped matrix this selects rus_Cyrl -> ukr_Cyrl, bul_Cyrl -> rus_Cyrl, spa_Latn ->
fra_Latn, urd_Arab -> hin_Deva, ita_Latn -> fra_Latn and arb_Arab -> tur_Latn (`--plan` prints it,
with every served language left out and why).

Per language L (on the model given, Gemma 3 270M by default, float32):
- fit: the recommended recipe (alignment.recipe.RECOMMENDED: ridge toward the identity, mean
  pooling, every layer, lambda per layer on 20% held-out pairs), on FLORES only by default
  (`--fit-data`, default sib200:train,dev: ~800 pairs), once L -> English and once L -> R, with the
  same L sentences; both fits take their L states from one extraction.
- retrieval: --pairs (300) NTREX line indices drawn with --seed (0) from the lines outside every
  NTREX range of the fit data that share no sentence with a fit pair and whose sentence occurs
  once in the NTREX file of every language measured (NTREX repeats a few short lines, e.g. Russian
  and Ukrainian lines 424 and 427: identical queries or keys make retrieval ill-posed)
  (bench/lowrank_quality.py's `heldout_ntrex`; one index set for every language and both
  targets). For each target T in {English, R}: is the nearest of T's 300 states (cosine, raw) to
  L's state the parallel sentence? Before (L's states as they are) and after (mapped toward T,
  alpha 1), per layer; a sentence's
  figure is its mean over the map's layers (as in bench/lowrank_quality.py). The P@1 at the
  after-map's best layer is reported beside, without a CI (the layer is picked on these sentences).
- figures: P@1 before and after and the gain (after - before) per target, with 95% percentile
  bootstrap CIs over sentences (`lingosteer.stats`, --bootstrap resamples); and the paired per-sentence
  differences R - English of the gain (the figure the question asks for), of after and of before.
  The two targets are different retrieval tasks (R's states and English's differ in how easily L's
  sentences find their translations before any map), so the "after" figures are not comparable
  as they stand: compare the gains. Means over languages weigh each language alike and resample the
  NTREX lines jointly across languages (`shared_items`: every language is scored on the same lines).

Outputs: `--out DIR` gets result.json (what --json prints: one object), result.md (the tables) and
result.png (gains per language and target, and the paired difference of gains). Progress bars go to
stderr (`--no-progress` hides them).

Time (2 cores, float32): states dominate, 35-70 ms per sentence on Gemma 3 270M (a trial here: 34
ms for English, 45 for Italian and French at load 1.3; bench/lowrank_quality.py's rates reach 70);
the default run extracts ~1,100 sentences for each of 11 languages (6 served, English, 4 distinct
R) once, 12,099 in all: ~7-14 min, plus ~3-10 s per fit (12 fits) and the model's load: ~10-16 min
on an idle machine, more on a shared one. `--plan` prints the sentence count and this estimate
for the languages chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import lowrank_quality as lowrank  # bench/: the held-out NTREX split, state cache, fit and retrieval
import numpy as np

from alignment.evaluate import retrieval_hits
from alignment.fitting import recipe_pairs
from lingosteer import DEFAULT_DATA_DIR, config_path
from lingosteer.data import load_ntrex, load_sib200
from lingosteer.files import write_text_atomic
from lingosteer.languages import UnknownLanguageError, get_language, normalize_code
from lingosteer.markdown import markdown_table
from lingosteer.stats import bootstrap_mean_ci
from matrix.artifact import InterferenceMatrix, load_interference
from matrix.recommend import recommend_sources

ENGLISH = "eng_Latn"
COUNT = 6
FIT_DATA = ("sib200:train,dev",)  # FLORES only: NTREX stays a domain no map has seen
DEFAULT_MATRIX = config_path("interference", "interference.json")
MARGIN_DECIMALS = 4  # the precision recommend's reasons print; completed entries tie beyond it
SECONDS_PER_SENTENCE = (0.035, 0.07)  # Gemma 3 270M states, 2 cores, float32 (bench/lowrank_quality.py)
SECONDS_PER_FIT = (3, 10)
TARGETS = ("english", "recommended")

SELECTION_RULE = (
    "Languages: those the project serves (an XCOPA validation file xcopa/val.<iso>.jsonl or an XNLI file "
    "xnli/dev.<iso>.tsv|.jsonl in the data directory) other than English and in the shipped matrix "
    "(configs/interference/interference.json). R = the first source recommend_sources ranks for L among the "
    "matrix's High-resource languages (completed entries allowed). Kept: L with SIB-200 train+dev and NTREX-128 "
    "data whose R is not English and has both too. Order: the margin of R over English in that ranking "
    "(score(R) - score(eng_Latn), rounded to 4 decimals), largest first, then the FLORES code; the first 6. "
    "No target: the figures are reported as measured, and no threshold decides anything."
)
NOTE = (
    "The two targets are different retrieval tasks (L's states find R's and English's translations with "
    "different ease before any map), so compare the gains (after - before), not the after figures; "
    "recommended_minus_english.gain is the paired per-sentence difference of the two gains."
)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---- the selection (pure given the matrix and the data directory) ---------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    """A language L and the high-resource language R its recommendation names."""

    language: str  # L, FLORES code
    target: str  # R
    score: float  # R's recommendation score (mean of I[L, R] and I[R, L])
    basis: str  # "measured" or "completed"
    reason: str  # recommend's sentence
    english_score: float  # English's score in the same ranking (nan: English not ranked)
    english_rank: int | None
    margin: float  # score - english_score, rounded to MARGIN_DECIMALS
    unrestricted: str  # recommend's first choice among all the matrix's languages


def high_resource(matrix: InterferenceMatrix) -> list[str]:
    """The matrix's languages of NLLB resource level High, in the matrix's order."""
    return [code for code in matrix.languages if get_language(code).resource == "High"]


def recommend_target(matrix: InterferenceMatrix, language: str) -> Choice:
    """L's recommended high-resource language R, with English's place in the same ranking."""
    code = normalize_code(language)
    if code not in matrix.languages:
        raise ValueError(f"{code} is not in the interference matrix ({len(matrix.languages)} languages: "
                         f"{' '.join(matrix.languages)})")
    candidates = [c for c in high_resource(matrix) if c != code]
    ranked = recommend_sources(matrix, code, k=max(1, len(candidates)), candidates=candidates)
    if not ranked:
        raise ValueError(f"the matrix recommends no high-resource language for {code}")
    top, english = ranked[0], next((r for r in ranked if r.language == ENGLISH), None)
    english_score = english.score if english is not None else math.nan
    return Choice(code, top.language, top.score, top.basis, top.reason, english_score,
                  None if english is None else english.rank, round(top.score - english_score, MARGIN_DECIMALS),
                  recommend_sources(matrix, code, k=1)[0].language)


def served_languages(data_dir: Path | None) -> list[str]:
    """FLORES codes of the languages with an XCOPA validation file or an XNLI file, sorted."""
    root = Path(data_dir or DEFAULT_DATA_DIR)
    files = [*(root / "xcopa").glob("val.*.jsonl"), *(root / "xnli").glob("dev.*.tsv"),
             *(root / "xnli").glob("dev.*.jsonl")]
    if not files:
        raise FileNotFoundError(f"no XCOPA (xcopa/val.<iso>.jsonl) or XNLI (xnli/dev.<iso>.tsv) files in {root}: "
                                f"the served languages are read from them")
    codes = set()
    for path in files:
        try:
            codes.add(normalize_code(path.name.split(".")[1]))
        except UnknownLanguageError:
            log(f"warning: {path} names a language the table does not know; left out")
    return sorted(codes)


def data_problem(language: str, data_dir: Path | None) -> str | None:
    """Why `language` cannot take part (no SIB-200 train+dev or no NTREX-128 file), or None."""
    try:
        load_sib200(language, ("train", "dev"), data_dir)
    except (FileNotFoundError, ValueError) as error:
        return f"no SIB-200 (FLORES) train+dev data: {str(error).split(';')[0]}"
    try:
        load_ntrex(language, data_dir)
    except (FileNotFoundError, ValueError) as error:
        return f"no NTREX-128 data: {str(error).split(';')[0]}"
    return None


def check_choice(choice: Choice, data_dir: Path | None) -> str | None:
    """Why L cannot be measured toward R and English, or None."""
    if choice.language == ENGLISH:
        return "English is the target the recommendation is compared with"
    if choice.target == ENGLISH:
        return "its recommended high-resource language is English: there is nothing to compare"
    for code, role in ((choice.language, "the language"), (choice.target, "its recommended language")):
        problem = data_problem(code, data_dir)
        if problem:
            return f"{role} {code} has {problem}"
    return None


def select_languages(matrix: InterferenceMatrix, data_dir: Path | None,
                     count: int = COUNT) -> tuple[list[Choice], dict[str, str]]:
    """SELECTION_RULE: (the first `count` choices, {served language left out: why})."""
    excluded, kept = {}, []
    for code in served_languages(data_dir):
        if code == ENGLISH:
            continue
        if code not in matrix.languages:
            excluded[code] = "not in the interference matrix"
            continue
        choice = recommend_target(matrix, code)
        problem = check_choice(choice, data_dir)
        if problem:
            excluded[code] = problem
        else:
            kept.append(choice)
    kept.sort(key=lambda c: (-c.margin if not math.isnan(c.margin) else math.inf, c.language))  # nan: last
    for choice in kept[count:]:
        excluded[choice.language] = (f"ranked {kept.index(choice) + 1} by the margin of {choice.target} over "
                                     f"English ({choice.margin:+.4f}); the rule takes the first {count}")
    return kept[:count], excluded


def resolve_languages(matrix: InterferenceMatrix, data_dir: Path | None, codes: list[str]) -> list[Choice]:
    """`--languages`: each code's recommendation, refused clearly when it cannot be measured."""
    choices, problems = [], []
    for code in codes:
        try:
            choice = recommend_target(matrix, code)
        except (UnknownLanguageError, ValueError) as error:
            problems.append(f"{code}: {error}")
            continue
        problem = check_choice(choice, data_dir)
        if problem:
            problems.append(f"{code} ({choice.language}): {problem}")
        choices.append(choice)
    if problems:
        raise ValueError("cannot measure: " + "; ".join(problems))
    if len({c.language for c in choices}) != len(choices):
        raise ValueError(f"--languages names a language twice: {', '.join(codes)}")
    return choices


# ---- the plan: pairs, the held-out split, the sentences to extract (no model) ---------------


def repeated_lines(codes: list[str], data_dir: Path | None) -> np.ndarray:
    """Bool mask over the NTREX lines: the line's sentence occurs on another line in one of `codes`' files
    (retrieval among identical keys or from identical queries has no right answer)."""
    files = {code: load_ntrex(code, data_dir) for code in codes}
    lengths = {len(lines) for lines in files.values()}
    if len(lengths) != 1:
        raise ValueError(f"NTREX files of {', '.join(codes)} differ in length: {sorted(lengths)}")
    mask = np.zeros(lengths.pop(), dtype=bool)
    for lines in files.values():
        counts = Counter(lines)
        mask |= np.array([counts[line] > 1 for line in lines])
    return mask


def plan(choices: list[Choice], recipe, pairs: int, seed: int, data_dir: Path | None) -> dict:
    """Fit pairs toward both targets, the held-out NTREX lines, and every language's sentences (each once)."""
    fit = {}
    for c in choices:
        fit[c.language] = {"english": recipe_pairs(recipe, c.language, ENGLISH),
                           "recommended": recipe_pairs(recipe, c.language, c.target)}
    codes = list(dict.fromkeys([ENGLISH, *(code for c in choices for code in (c.language, c.target))]))
    repeated = repeated_lines(codes, data_dir)
    split = lowrank.heldout_ntrex(recipe, {c.language: fit[c.language]["english"][1] + fit[c.language]["recommended"][1]
                                           for c in choices}, pairs, seed, data_dir, exclude=repeated)
    held = {}
    for c in choices:
        source, target = load_ntrex(c.language, data_dir), load_ntrex(c.target, data_dir)
        held[c.language] = {"english": split["pairs"][c.language],
                            "recommended": [(source[i], target[i]) for i in split["indices"]]}
        seen = {text for pair in fit[c.language]["recommended"][1] for text in pair}
        overlap = [int(i) for i, (_, text) in zip(split["indices"], held[c.language]["recommended"]) if text in seen]
        if overlap:  # heldout_ntrex checked L and English; R's side is checked here
            raise ValueError(f"{c.target}'s NTREX lines {overlap[:5]} are sentences of the {c.language} -> "
                             f"{c.target} fit pairs: pick another --seed")
    sentences = defaultdict(list)
    for c in choices:
        for key, target in (("english", ENGLISH), ("recommended", c.target)):
            for src, tgt in fit[c.language][key][1] + held[c.language][key]:
                sentences[c.language].append(src)
                sentences[target].append(tgt)
    unique = {code: list(dict.fromkeys(texts)) for code, texts in sentences.items()}
    return {"fit": fit, "split": split, "held": held, "sentences": unique, "repeated_lines": int(repeated.sum())}


def estimate_seconds(sentences: int, fits: int) -> tuple[float, float]:
    return tuple(sentences * s + fits * f for s, f in zip(SECONDS_PER_SENTENCE, SECONDS_PER_FIT))


# ---- figures (pure) ---------------------------------------------------------------------------


def summarise(hits: dict, resamples: int, seed: int) -> tuple[dict, dict]:
    """(per language, mean over languages) figures from `hits[L][target][before|after]`: bool [layers, pairs]."""
    per_sentence = {code: {t: {when: h[t][when].mean(axis=0) for when in ("before", "after")} for t in TARGETS}
                    for code, h in hits.items()}

    def figure(samples: list[np.ndarray]) -> dict:
        shared = len(samples) > 1  # the same NTREX lines for every language: resample them jointly
        return {"value": float(np.mean([s.mean() for s in samples])),
                "ci95": list(bootstrap_mean_ci(samples, resamples, seed, shared_items=shared))}

    def figures(codes: list[str]) -> dict:
        out = {}
        for t in TARGETS:
            before = [per_sentence[c][t]["before"] for c in codes]
            after = [per_sentence[c][t]["after"] for c in codes]
            out[t] = {"p1_before": figure(before), "p1_after": figure(after),
                      "gain": figure([a - b for a, b in zip(after, before)])}
        e, r = ([per_sentence[c][t] for c in codes] for t in TARGETS)
        out["recommended_minus_english"] = {
            "gain": figure([(x["after"] - x["before"]) - (y["after"] - y["before"]) for x, y in zip(r, e)]),
            "p1_after": figure([x["after"] - y["after"] for x, y in zip(r, e)]),
            "p1_before": figure([x["before"] - y["before"] for x, y in zip(r, e)]),
        }
        out["recommended_minus_english"]["reading"] = reading(out["recommended_minus_english"]["gain"])
        return out

    per_language = {}
    for code, h in hits.items():
        per_language[code] = figures([code])
        for t in TARGETS:
            before, after = h[t]["before"].mean(axis=1), h[t]["after"].mean(axis=1)
            best = int(np.argmax(after))
            per_language[code][t].update({"p1_before_per_layer": before.tolist(), "p1_after_per_layer": after.tolist(),
                                          "best_layer_index": best, "p1_after_best_layer": float(after[best]),
                                          "p1_before_at_best_layer": float(before[best])})
    return per_language, figures(list(hits))


def reading(gain_difference: dict) -> str:
    """What the paired difference of gains says, in words (a description, not a decision)."""
    low, high = gain_difference["ci95"]
    if low > 0:
        return "toward R gains more than toward English (95% CI above 0)"
    if high < 0:
        return "toward English gains more than toward R (95% CI below 0)"
    return "no difference detectable between the two gains (95% CI across 0)"


# ---- reports ------------------------------------------------------------------------------------


def _fig(f: dict, digits: int = 3, sign: str = "") -> str:
    low, high = f["ci95"]
    return f"{f['value']:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def markdown(report: dict) -> str:
    rows = []
    for code in [*report["languages"], "mean"]:
        r = report["mean"] if code == "mean" else report["results"][code]
        target = "" if code == "mean" else f"{r['recommended_language']} ({r['recommendation']['basis']})"
        e, t, d = r["english"], r["recommended"], r["recommended_minus_english"]
        rows.append([f"**{code}**" if code == "mean" else code, target,
                     f"{e['p1_before']['value']:.3f} -> {e['p1_after']['value']:.3f}", _fig(e["gain"], sign="+"),
                     f"{t['p1_before']['value']:.3f} -> {t['p1_after']['value']:.3f}", _fig(t["gain"], sign="+"),
                     _fig(d["gain"], sign="+"), _fig(d["p1_before"], sign="+")])
    header = ["language L", "R (basis)", "toward English: before -> after", "gain [95% CI]",
              "toward R: before -> after", "gain [95% CI]", "gain R - English [95% CI]",
              "before R - English [95% CI]"]
    number = lambda value: "-" if value is None else f"{value:+.4f}"  # noqa: E731  (None: English not ranked)
    choices = [[c["language"], c["target"], number(c["score"]), c["basis"], number(c["english_score"]),
                str(c["english_rank"] or "-"), number(c["margin"]), c["unrestricted"]] for c in report["choices"]]
    choice_header = ["L", "R", "score(R)", "basis", "score(English)", "English's rank", "margin", "unrestricted first"]
    split, load = report["ntrex_split"], report["load_average"]
    return (
        f"# Aligning toward the recommended high-resource language ({report['model']})\n\n"
        f"Measured, no target. Fit: {report['recipe']['solver']}, {report['recipe']['pooling']} pooling, on "
        f"{' + '.join(report['recipe']['data'])}, once toward English and once toward R. Retrieval: "
        f"{split['eval_pairs']} NTREX lines never fitted on (seed {split['seed']}, from {split['pool_size']}), raw "
        f"P@1 of L's states among the target's, mean over {len(report['layers'])} layers; 95% bootstrap CIs over "
        f"sentences ({report['bootstrap']['resamples']} resamples).\n\n{markdown_table(header, rows)}\n\n"
        f"{report['note']}\n\nMean over languages: {report['mean']['recommended_minus_english']['reading']}.\n\n"
        f"Recommendations (selection: {report['selection']}):\n\n{markdown_table(choice_header, choices)}\n\n"
        f"Rule: {report['selection_rule']}\n\n"
        f"{report['wall_seconds']:.0f} s wall, load average {' / '.join(f'{v:.2f}' for v in load['start'])} at "
        f"start, {' / '.join(f'{v:.2f}' for v in load['end'])} at the end.\n"
    )


def plot(report: dict, path: Path) -> None:
    """Gain per language toward English and toward R, and their paired difference, with 95% CIs."""
    from lingosteer.figures import pyplot, save_figure

    plt = pyplot()
    codes = [*report["languages"], "mean"]
    rows = [report["mean"] if c == "mean" else report["results"][c] for c in codes]
    x = np.arange(len(codes))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))

    def bars(ax, figures, offset, width, label, color):
        values = [f["value"] for f in figures]
        errors = np.array([[f["value"] - f["ci95"][0], f["ci95"][1] - f["value"]] for f in figures]).T
        ax.bar(x + offset, values, width, yerr=errors, capsize=2, label=label, color=color)

    bars(axes[0], [r["english"]["gain"] for r in rows], -0.2, 0.4, "toward English", "tab:blue")
    bars(axes[0], [r["recommended"]["gain"] for r in rows], 0.2, 0.4, "toward R", "tab:orange")
    bars(axes[1], [r["recommended_minus_english"]["gain"] for r in rows], 0.0, 0.6, "R - English", "tab:green")
    labels = [c if c == "mean" else f"{c}\n-> {report['results'][c]['recommended_language']}" for c in codes]
    for ax, ylabel in ((axes[0], "NTREX P@1 gain (after - before)"), (axes[1], "gain toward R - gain toward English")):
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(report['model']).name}: maps toward the recommended high-resource language R vs English\n"
                 f"held-out NTREX P@1, mean over layers, 95% CIs; measured, no target", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "result.json", "markdown": out / "result.md", "plot": out / "result.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(report))
    plot(report, paths["plot"])
    return paths


# ---- the run ------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a prepared model's name or a HF model directory")
    parser.add_argument("--languages", default=None,
                        help="comma-separated codes instead of the rule's selection (each still aligned toward its "
                             "recommended high-resource language)")
    parser.add_argument("--count", type=int, default=COUNT, help="how many languages the rule takes")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="interference.json")
    parser.add_argument("--fit-data", nargs="+", default=list(FIT_DATA), help="parallel sources of both fits")
    parser.add_argument("--pairs", type=int, default=300, help="held-out NTREX pairs for retrieval")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out NTREX lines and the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of every CI")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per forward pass of extraction")
    parser.add_argument("--data", "--data-dir", dest="data_dir", type=Path, default=None,
                        help="data root holding sib200/, ntrex128/, xcopa/ and xnli/")
    parser.add_argument("--out", type=Path, default=Path("reports/recommended-target"))
    parser.add_argument("--plan", action="store_true", help="print the selection and the work, load no model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def choice_record(choice: Choice) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(choice).items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    wall, load_start = time.perf_counter(), os.getloadavg()
    if args.pairs < 2:
        raise ValueError("--pairs must be at least 2")
    matrix = load_interference(args.matrix)
    if args.languages:
        choices = resolve_languages(matrix, args.data_dir, [c.strip() for c in args.languages.split(",") if c.strip()])
        excluded, selection = {}, "--languages"
    else:
        choices, excluded = select_languages(matrix, args.data_dir, args.count)
        selection = "the rule"
        if not choices:
            raise ValueError("the rule selects no language: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    recipe = lowrank.fit_recipe(list(args.fit_data), args.data_dir)
    work = plan(choices, recipe, args.pairs, args.seed, args.data_dir)
    total = sum(len(texts) for texts in work["sentences"].values())
    low, high = estimate_seconds(total, 2 * len(choices))

    if args.plan:
        lines = [f"selection ({selection}): " + ", ".join(f"{c.language} -> {c.target} (margin {c.margin:+.4f}, "
                                                          f"{c.basis})" for c in choices)]
        lines += [f"  left out {code}: {why}" for code, why in excluded.items()]
        lines += [f"sentences to extract: {total} over {len(work['sentences'])} languages ("
                  + ", ".join(f"{code} {len(t)}" for code, t in work["sentences"].items()) + ")",
                  f"held-out NTREX lines: {args.pairs} of {work['split']['pool_size']} ({work['repeated_lines']} left "
                  f"out as repeated sentences); fits: {2 * len(choices)}",
                  f"estimate on Gemma 3 270M, 2 idle cores: {low / 60:.0f}-{high / 60:.0f} min plus the model's load"]
        print(json.dumps({"choices": [choice_record(c) for c in choices], "excluded": excluded,
                          "sentences": total, "estimate_seconds": [low, high]}) if args.json else "\n".join(lines))
        return 0

    from tqdm.auto import tqdm

    from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
    from lingosteer.fingerprint import model_fingerprint
    from lingosteer.models import resolve_model

    model_dir = resolve_model(args.model)
    fingerprint = model_fingerprint(model_dir)
    layers = list(recipe.layers or range(fingerprint["num_hidden_layers"]))
    recipe = dataclasses.replace(recipe, layers=tuple(layers))
    log(f"{len(choices)} languages, {total} sentences to extract; estimate {low / 60:.0f}-{high / 60:.0f} min")
    states = functools.partial(extract_hidden_states, *load_model_and_tokenizer(model_dir), layers=layers,
                               pooling=recipe.pooling, batch_size=args.batch_size, progress=not args.no_progress)

    phases, cache = {}, {}
    bar = tqdm(work["sentences"].items(), desc="languages", unit="language", disable=args.no_progress)
    for code, texts in bar:  # every language's sentences once: English and R serve several fits
        bar.set_postfix_str(code)
        start = time.perf_counter()
        cache[code] = lowrank.EnglishStates(states, texts)
        phases[f"{code}_states"] = time.perf_counter() - start
        log(f"{code}: {len(texts)} sentences in {phases[f'{code}_states']:.0f} s")

    hits, results = {}, {}
    for c in tqdm(choices, desc="fits", unit="language", disable=args.no_progress):
        start = time.perf_counter()
        hits[c.language], fitted = {}, {}
        for key, target in (("english", ENGLISH), ("recommended", c.target)):
            sources, pairs = work["fit"][c.language][key]
            held = work["held"][c.language][key]
            aligner = lowrank.fit_forms(recipe, cache[c.language]([s for s, _ in pairs]),
                                        cache[target]([t for _, t in pairs]), [])[lowrank.FULL]
            X, Y = cache[c.language]([s for s, _ in held]), cache[target]([t for _, t in held])
            hits[c.language][key] = {
                "before": np.stack([retrieval_hits(X[i], Y[i]) for i in range(len(layers))]),
                "after": lowrank.retrieval(aligner, X, Y),
            }
            fitted[key] = {"target": target, "fit_pairs": len(pairs), "sources": sources,
                           "lambdas": aligner.lambdas_.tolist()}
        phases[f"{c.language}_fits"] = time.perf_counter() - start
        results[c.language] = {"recommended_language": c.target, "recommendation": choice_record(c), "fits": fitted}
        log(f"{c.language}: toward English P@1 {hits[c.language]['english']['before'].mean():.3f} -> "
            f"{hits[c.language]['english']['after'].mean():.3f}, toward {c.target} "
            f"{hits[c.language]['recommended']['before'].mean():.3f} -> "
            f"{hits[c.language]['recommended']['after'].mean():.3f} ({phases[f'{c.language}_fits']:.0f} s)")

    per_language, mean = summarise(hits, args.bootstrap, args.seed)
    for code, figures in per_language.items():
        results[code].update(figures)
    split = work["split"]
    report = {
        "question": "Does aligning toward the recommended high-resource language instead of English change "
                    "retrieval P@1 on NTREX sentences never fitted on?",
        "status": "measured, no target",
        "model": str(args.model), "hidden_size": fingerprint["hidden_size"], "layers": layers,
        "languages": [c.language for c in choices], "selection": selection,
        "choices": [choice_record(c) for c in choices], "excluded": excluded,
        "matrix": str(args.matrix),
        "recipe": {"solver": recipe.solver, "pooling": recipe.pooling, "data": list(recipe.data),
                   "holdout_fraction": recipe.holdout_fraction},
        "ntrex_split": {"corpus": "ntrex128", "eval_pairs": args.pairs, "seed": args.seed,
                        "pool": "NTREX lines outside the fit data's NTREX ranges sharing no sentence with a fit pair, "
                                "whose sentence occurs once in each file of the languages measured",
                        "repeated_lines_left_out": work["repeated_lines"],
                        "pool_size": split["pool_size"], "indices": split["indices"].tolist()},
        "results": results, "mean": mean, "note": NOTE, "selection_rule": SELECTION_RULE,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "unit": "NTREX sentence",
                      "mean_over_languages": "each language weighs alike; lines resampled jointly (shared_items)"},
        "phase_seconds": phases, "wall_seconds": time.perf_counter() - wall,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    paths = write_reports(report, args.out)
    log(f"wrote {', '.join(map(str, paths.values()))}")
    print(json.dumps(report) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
