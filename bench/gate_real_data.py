"""Evidence on real data (#34, item 3): the default gate design's decisions checked on items no build saw.

    python bench/gate_real_data.py --model gemma-3-270m --out reports/gate-real-data \\
        [--languages sw,th] [--unseen 500] [--calibration-items 100] [--artifacts DIR] [--json]

1. One `lingosteer align build` for all languages together (the default design, `auto`:
   `gate_designs.DEFAULT_SHARED_DESIGN` for two or more), calibrated on the first `--calibration-items`
   items of each XNLI dev file (`<data>/xnli/dev.<iso>.tsv`, 2,490 items each), artifacts under `<out>/artifacts`
   (`--artifacts DIR` reuses an earlier build instead).
2. For the languages the gate steered: `lingosteer bench xnli` at the artifacts' serving defaults
   against plain on the next `--unseen` items of the same files (`--skip-items` = the calibration
   items: the bench refuses to report serving defaults on the items that chose them).
   A language kept off serves plain requests: it is plain by construction (difference 0) and is
   not scored twice.
3. Per language: the decision (and the configuration served), plain and steered accuracy, the paired
   difference with its 95% bootstrap CI (`lingosteer.stats.bootstrap_delta_ci`, the item is the unit),
   exact McNemar p, and whether the language is significantly worse (CI upper end below 0).
   Target (#34): no language significantly worse on unseen items than plain.

Writes `<out>/result.json` and `<out>/result.md`; with --json prints the result to stdout.
Runtime on 2 CPU cores (docs/benchmarks.md, XNLI builds): ~2 min fit per language, then 25 conditions x
3 options x `--calibration-items` scoring requests per language at 8-14 requests/s (9-16 min per language
at 100 items), then 2 x 3 x `--unseen` requests per steered language (4-6 min at 500): the 14 languages
take about 3-4 hours, two languages (the fewest the default's shared design takes) about 30 minutes
plus the unseen check of those steered.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
XNLI_LANGUAGES = ("ar", "bg", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")  # not en
CALIBRATION_ITEMS = 100
UNSEEN_ITEMS = 500
RESAMPLES = 10000


def parse_args(argv=None):
    from lingosteer import DEFAULT_DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for the artifacts, the bench and result.*")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR / "xnli",
                        help="directory of dev.<iso>.tsv files (default %(default)s)")
    parser.add_argument("--languages", default=",".join(XNLI_LANGUAGES),
                        help="comma-separated ISO codes (default: the 14 non-English XNLI languages)")
    parser.add_argument("--calibration-items", type=int, default=CALIBRATION_ITEMS,
                        help="the first N dev items of each language calibrate the build (default %(default)s)")
    parser.add_argument("--unseen", type=int, default=UNSEEN_ITEMS,
                        help="items after the calibration items that check the decisions (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="reuse the artifacts of an earlier build (a directory with one artifact per language)")
    parser.add_argument("--engine-dtype", default="float32", help="dtype of the scoring engines (default float32)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object to stdout")
    return parser.parse_args(argv)


# ---- the commands ---------------------------------------------------------------------


def xnli_files(data_dir: Path, languages: list[str]) -> dict[str, Path]:
    """ISO code -> dev file, refusing English and languages without one."""
    if "en" in languages:
        raise ValueError("English is the target language: nothing to steer")
    files = {iso: data_dir / f"dev.{iso}.tsv" for iso in languages}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no XNLI dev file: {', '.join(missing)}")
    return files


def build_command(model: str, files: dict[str, Path], artifacts: Path, calibration_items: int,
                  dtype: str) -> list[str]:
    """One `align build` for all languages: the default gate design (`auto`: DEFAULT_SHARED_DESIGN for 2 or more,
    current for one). Artifacts go to `artifacts/<FLORES code>` (a one-language build writes its artifact at --out
    itself)."""
    from lingosteer.languages import normalize_code

    out = artifacts / normalize_code(next(iter(files))) if len(files) == 1 else artifacts
    return ["align", "build", "--model", model, "--source", ",".join(files), "--calibrate",
            *map(str, files.values()), "--calibration-max-items", str(calibration_items),
            "--engine-dtype", dtype, "--out", str(out), "--overwrite"]


def bench_command(model: str, artifacts: Path, files: dict[str, Path], calibration_items: int, unseen: int,
                  out: Path, dtype: str) -> list[str]:
    """`bench xnli` at the artifacts' serving defaults on the items after the calibrated ones."""
    return ["bench", "xnli", "--model", model, "--interventions", str(artifacts), "--eval", *map(str, files.values()),
            "--skip-items", str(calibration_items), "--max-items", str(unseen), "--dtype", dtype, "--out", str(out)]


def lingosteer(args: list[str], log: Path) -> None:
    """Run one `lingosteer` command (printed first), its stderr to `log`."""
    print("$ lingosteer " + " ".join(args) + f"   (log: {log})", file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-m", "lingosteer.entrypoints.main", *args], stderr=stderr,
                              stdout=subprocess.DEVNULL, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"`lingosteer {' '.join(args[:2])}` failed (exit {done.returncode}); "
                         f"the end of {log}:\n{log.read_text()[-3000:]}")


def decisions(artifacts: Path, languages: list[str]) -> dict[str, dict]:
    """ISO code -> the build's verdict for that language, read from its manifest."""
    from alignment.artifact import read_manifest
    from lingosteer.languages import normalize_code

    found = {}
    for iso in languages:
        manifest = read_manifest(artifacts / normalize_code(iso))
        evidence = manifest.evidence
        if evidence is None or evidence.design is None:
            raise ValueError(f"{artifacts / normalize_code(iso)} was not calibrated by a gate design")
        steered = manifest.serving.alpha != 0
        found[iso] = {"steered": steered, "serving": manifest.serving.describe() if steered else "off",
                      "design": evidence.design, "decision": evidence.decision,
                      "calibration_items": evidence.items, "calibration_file": Path(evidence.file).name}
    return found


def read_outcomes(items_jsonl: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ISO code -> (plain, steered) per-item correctness, from the bench's items.jsonl."""
    rows: dict[str, list] = {}
    for line in items_jsonl.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rows.setdefault(record["language"], []).append((record["baseline_correct"], record["intervened_correct"]))
    return {iso: (np.array([p for p, _ in pairs], bool), np.array([s for _, s in pairs], bool))
            for iso, pairs in rows.items()}


# ---- the report (pure: tests/test_gate_real_data.py) -------------------------------------


def language_row(iso: str, decision: dict, outcome: tuple[np.ndarray, np.ndarray] | None,
                 resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """One language's line: a steered language needs its unseen items' outcome; one kept off has none (plain)."""
    from evaluation.stats import mcnemar_exact
    from lingosteer.stats import bootstrap_delta_ci

    row = {"language": iso, **decision}
    if not decision["steered"]:
        if outcome is not None:
            raise ValueError(f"{iso} is off: it serves plain, there is nothing to compare")
        return {**row, "items": 0, "plain_accuracy": None, "steered_accuracy": None, "difference": 0.0,
                "ci95": None, "mcnemar_p": None, "plain_only": None, "steered_only": None,
                "significantly_worse": False, "note": "off: plain by construction (difference 0), not scored"}
    if outcome is None:
        raise ValueError(f"{iso} is steered but its unseen items were not scored")
    plain, steered = (np.asarray(x, bool) for x in outcome)
    if plain.shape != steered.shape or plain.size == 0:
        raise ValueError(f"{iso}: plain and steered must be scored on the same, non-empty items")
    low, high = bootstrap_delta_ci([(plain, steered)], resamples=resamples, seed=seed)
    test = mcnemar_exact(plain, steered)
    return {**row, "items": int(plain.size), "plain_accuracy": float(plain.mean()),
            "steered_accuracy": float(steered.mean()), "difference": float(steered.mean() - plain.mean()),
            "ci95": [low, high], "mcnemar_p": test["p"], "plain_only": test["baseline_only"],
            "steered_only": test["intervened_only"], "significantly_worse": bool(high < 0),
            "note": "steered at the serving defaults"}


def summarize(rows: list[dict], **facts) -> dict:
    """The whole check: the rows, which languages were steered and which are significantly worse."""
    worse = [row["language"] for row in rows if row["significantly_worse"]]
    return {
        "target": "no language significantly worse on unseen items than plain under the default design's "
                  "decisions (95% CI of the paired difference below 0)",
        "target_met": not worse, "significantly_worse": worse,
        "steered": [row["language"] for row in rows if row["steered"]],
        "off": [row["language"] for row in rows if not row["steered"]],
        **facts, "languages": rows,
    }


def _points(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def markdown(result: dict) -> str:
    from lingosteer.markdown import markdown_table

    rows = []
    for row in result["languages"]:
        if row["steered"]:
            ci = f"{_points(row['difference'])} [{_points(row['ci95'][0])}, {_points(row['ci95'][1])}]"
            cells = [f"{row['plain_accuracy']:.3f}", f"{row['steered_accuracy']:.3f}", ci, f"{row['mcnemar_p']:.3g}",
                     "**yes**" if row["significantly_worse"] else "no"]
        else:
            cells = ["", "", "0 (plain by construction)", "", "no"]
        rows.append([row["language"], row["serving"], row["items"], *cells])
    table = markdown_table(["language", "decision", "unseen items", "plain", "steered", "difference, points [95% CI]",
                            "McNemar p", "significantly worse"], rows)
    verdict = ("target met: no language significantly worse than plain" if result["target_met"] else
               f"target missed: significantly worse: {', '.join(result['significantly_worse'])}")
    return f"{table}\n\n{verdict}\n"


# ---- main ------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    languages = [part.strip() for part in args.languages.split(",") if part.strip()]
    if len(set(languages)) != len(languages) or not languages:
        raise SystemExit(f"--languages must name distinct languages, got {args.languages!r}")
    if args.calibration_items < 1 or args.unseen < 1:
        raise SystemExit("--calibration-items and --unseen must be positive")
    files = xnli_files(args.data, languages)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    artifacts = args.artifacts or args.out / "artifacts"
    if args.artifacts is None:
        lingosteer(build_command(args.model, files, artifacts, args.calibration_items, args.engine_dtype),
                   args.out / "build.log")
    built = time.perf_counter()
    verdicts = decisions(artifacts, languages)
    mismatched = [iso for iso, v in verdicts.items() if v["calibration_items"] != args.calibration_items]
    if mismatched:
        raise SystemExit(f"{', '.join(mismatched)}: calibrated on a different number of items than "
                         f"--calibration-items {args.calibration_items}")
    steered = {iso: files[iso] for iso, v in verdicts.items() if v["steered"]}
    outcomes = {}
    if steered:
        bench = args.out / "bench"
        lingosteer(bench_command(args.model, artifacts, steered, args.calibration_items, args.unseen, bench,
                                 args.engine_dtype), args.out / "bench.log")
        outcomes = read_outcomes(bench / "items.jsonl")
    rows = [language_row(iso, verdicts[iso], outcomes.get(iso) if verdicts[iso]["steered"] else None)
            for iso in languages]
    result = summarize(rows, model=args.model, calibration_items=args.calibration_items, unseen_items=args.unseen,
                       artifacts=str(artifacts), build_seconds=round(built - start, 1),
                       check_seconds=round(time.perf_counter() - built, 1))
    (args.out / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (args.out / "result.md").write_text(markdown(result))
    print(json.dumps(result, ensure_ascii=False) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
