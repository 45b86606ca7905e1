"""One serving configuration shared by all languages, each language judged on a choice made without it.

    python bench/pooled_choice.py interventions/built interventions/built-xnli [--json]

Per-language calibration (`align build`) sees 100-200 items, too few for its gate to tell a
gain of 1-2 points from noise. A configuration shared across languages draws on all their
items. This reads the calibration evidence that `align build` wrote into each artifact
(every candidate's and the plain accuracy on the language's calibration items; nothing is
scored again) and applies `evaluation.calibration.choose_across_languages`: per language,
the candidate best on the other languages, and its gain on this one. Per task: the mean of
those held-out gains with a 95% t-interval over languages (the language is the unit), and
how many languages went up and down. The rule was written down before it was first run
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from alignment.artifact import MANIFEST_NAME, discover_interventions, load_intervention
from evaluation.calibration import choose_across_languages, search_space


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories of artifacts built by `align build`")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def calibration_gains(roots: list[Path]) -> dict[str, dict[str, dict]]:
    """task -> language -> {candidate: accuracy - plain}, from the artifacts' evidence."""

    gains: dict[str, dict[str, dict]] = {}
    for root in roots:
        artifacts = discover_interventions(root)  # {source: directory}; one artifact per language
        if not artifacts:
            raise FileNotFoundError(f"{root}: no artifacts (directories with {MANIFEST_NAME})")
        for path in artifacts.values():
            artifact = load_intervention(path)
            evidence = artifact.evidence
            if not evidence:
                raise ValueError(f"{path}: no calibration evidence (built by `align fit`, not `align build`)")
            candidates = {c.describe(): c for c in search_space(artifact.layers)}
            language = gains.setdefault(evidence.task, {})
            if artifact.source in language:
                raise ValueError(f"{path}: a second {evidence.task} artifact for {artifact.source}")
            language[artifact.source] = {candidates[name]: accuracy - evidence.plain_accuracy
                                         for name, accuracy in evidence.candidate_accuracy.items()}
    return gains


def summarise(gains: dict[str, dict]) -> dict:
    from scipy import stats

    chosen = choose_across_languages(gains)
    held_out = {language: gains[language][config] for language, config in chosen.items()}
    values = np.array(list(held_out.values()))
    spread = stats.sem(values)  # 0 when every language moved alike: the interval is that point
    low, high = (stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=spread) if spread > 0
                 else (values.mean(), values.mean()))
    return {
        "languages": {language: {"chosen_on_the_others": chosen[language].describe(), "gain": held_out[language]}
                      for language in sorted(held_out)},
        "mean_gain": float(values.mean()), "mean_gain_ci95": [float(low), float(high)],
        "up": int((values > 0).sum()), "down": int((values < 0).sum()),
    }


def markdown(task: str, summary: dict) -> str:
    low, high = summary["mean_gain_ci95"]
    lines = [f"{task}: mean gain {100 * summary['mean_gain']:+.2f} points, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}]"
             f" over {len(summary['languages'])} languages; {summary['up']} up, {summary['down']} down",
             "", "| language | chosen on the other languages | gain, points |", "|---|---|---|"]
    lines += [f"| {language} | {row['chosen_on_the_others']} | {100 * row['gain']:+.1f} |"
              for language, row in summary["languages"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {task: summarise(gains) for task, gains in calibration_gains(args.roots).items()}
    if args.json:
        print(json.dumps(result))
    else:
        print("\n\n".join(markdown(task, summary) for task, summary in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
