"""The gate's operating characteristic: adoption rate vs true gain for each calibration design.

    python bench/gate_power.py [--json] [--builds 400] [--discordance 0.06,0.15,0.34] [--figure PATH]
        [--designs pooled,sequential] [--merge docs/bench/gate-power/result.json]

Simulates XCOPA-sized calibrations (100 items in each of 11 languages at their measured plain
accuracies; `evaluation.gate_power` states the model) through each design's real decision code
(`evaluation.gate_designs.DESIGNS`), at the discordance rates seen in our evidence. The first
discordance is the primary setting that `DEFAULT_RULE` (written before the run) judges; the
others show how the result moves. Prints a table, or with --json one object:
{"default": NAME, "designs": {NAME: {"adoption": {"+3.6": p, "0": p, "-1": p}, "mixed": p,
"items_scored": {"+3.6": f, "0": f, "-1": f, "mixed": f}, ...}}, ...}; `items_scored` is the mean share of each
language's items the decision needed scored (below 1 only for a design that stops early: `sequential`), and
`scorings` the same share of (item, condition) scorings.
--designs runs some designs only; with --merge RESULT_JSON their results replace or join those of an earlier run
(same builds and seed) and the default is chosen over them all, as if run together (each design's draws depend
only on the seed, so the numbers are the same).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GAINS = (-0.03, -0.01, 0.0, 0.01, 0.02, 0.036, 0.06, 0.10)  # the curve; it holds the targets' -1, 0 and +3.6
HEADLINE = {"+3.6": 0.036, "0": 0.0, "-1": -0.01}
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "bench" / "gate-power" / "operating-characteristic.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    parser.add_argument("--builds", type=int, default=400, help="simulated builds per point (default 400)")
    parser.add_argument("--discordance", default="0.06,0.15,0.34",
                        help="shares of items that change answer under steering; the first is the primary setting")
    parser.add_argument("--designs", default=None, help="comma-separated design names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", type=Path, default=None, metavar="RESULT_JSON",
                        help="an earlier run's --json output: keep its other designs, choose the default over all")
    parser.add_argument("--figure", type=Path, default=FIGURE, help=f"PNG of the curves (default {FIGURE})")
    return parser.parse_args(argv)


def evaluate(design, discordance: float, builds: int, seed: int) -> dict:
    """One design at one discordance: its curve, the targets' points, the mixed case, its minimum detectable gain,
    and the shares of items and scorings its decisions needed."""
    from evaluation.gate_power import (
        Setting,
        minimum_detectable_gain,
        mixed_case_with_cost,
        operating_characteristic_with_cost,
    )

    setting = Setting(discordance=discordance)
    curve = operating_characteristic_with_cost(design, setting, GAINS, builds, seed, progress=True)
    mixed = mixed_case_with_cost(design, setting, builds, seed + 1, progress=True)
    headline = {key: curve[gain] for key, gain in HEADLINE.items()}
    return {
        "summary": design.summary, "candidates": len(design.space(list(range(18)))), "shared": design.shared,
        "min_items": design.min_items,
        "adoption": {key: point["rate"] for key, point in headline.items()},
        "mixed": mixed["rate"],
        "mc_se": {**{key: point["se"] for key, point in headline.items()}, "mixed": mixed["se"]},
        "items_scored": {**{key: point["items"] for key, point in headline.items()}, "mixed": mixed["items"]},
        "scorings": {**{key: point["scorings"] for key, point in headline.items()}, "mixed": mixed["scorings"]},
        "curve": {f"{100 * gain:+g}": point["rate"] for gain, point in curve.items()},
        "min_detectable_gain": minimum_detectable_gain(
            design, setting.items, discordance, curve={gain: (point["rate"], point["se"]) for gain, point in
                                                       curve.items()}),
    }


def check_merge(earlier: dict, discordances: list[float], builds: int, seed: int) -> None:
    """Refuse, before anything is simulated, to merge into a run whose rows would not be comparable."""
    if (earlier.get("builds"), earlier.get("seed")) != (builds, seed):
        raise SystemExit(f"--merge: that run had {earlier.get('builds')} builds and seed {earlier.get('seed')}; "
                         f"this one {builds} and {seed}: rerun with the same --builds and --seed")
    missing = sorted({f"{d:g}" for d in discordances} - set(earlier["by_discordance"]))
    if missing:
        raise SystemExit(f"--merge: that run has no discordance {', '.join(missing)}")


def merge(earlier: dict, by_discordance: dict[str, dict]) -> dict[str, dict]:
    """`earlier`'s designs at each of its discordances, with those just run replacing or joining them."""
    merged = {d: dict(designs) for d, designs in earlier["by_discordance"].items()}
    for d, designs in by_discordance.items():
        merged[d].update(designs)
    return merged


def figure(results: dict[float, dict[str, dict]], path: Path) -> Path:
    from lingosteer.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (discordance, designs) in zip(axes[0], results.items()):
        for name, result in designs.items():
            gains = [float(key) for key in result["curve"]]
            ax.plot(gains, list(result["curve"].values()), marker="o", label=name)
        ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.05, color="grey", linestyle="--", linewidth=1)
        ax.axvline(3.6, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"discordance {discordance:g}: 100 items x 11 languages")
        ax.set_xlabel("true gain, points (every language)")
    axes[0][0].set_ylabel("adoption rate per language")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def table(result: dict) -> str:
    lines = []
    for discordance, designs in result["by_discordance"].items():
        lines += [f"discordance {discordance} ({result['builds']} builds per point)", "",
                  "| design | candidates | +3.6 | 0 | -1 | mixed: -3 language | min. detectable gain (80%) "
                  "| items scored (+3.6 / 0 / -1 / mixed) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in designs.items():
            a, se = r["adoption"], r["mc_se"]
            cells = [f"{a[key]:.3f} +- {se[key]:.3f}" for key in HEADLINE] + [f"{r['mixed']:.3f} +- {se['mixed']:.3f}"]
            scored = r.get("items_scored")  # runs before `sequential` did not record it (everything was scored)
            scored = " / ".join(f"{scored[key]:.2f}" for key in (*HEADLINE, "mixed")) if scored else "1 (all)"
            lines.append(f"| {name} | {r['candidates']} | {' | '.join(cells)} | {r['min_detectable_gain'] * 100:.1f} "
                         f"| {scored} |")
        lines.append("")
    lines.append(f"default: {result['default']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from evaluation.gate_designs import DESIGNS
    from evaluation.gate_power import DEFAULT_RULE, choose_default

    args = parse_args(argv)
    names = args.designs.split(",") if args.designs else list(DESIGNS)
    unknown = sorted(set(names) - set(DESIGNS))
    if unknown:
        raise SystemExit(f"unknown designs {unknown}; known: {', '.join(DESIGNS)}")
    discordances = [float(part) for part in args.discordance.split(",")]
    earlier = json.loads(args.merge.read_text()) if args.merge is not None else None
    if earlier is not None:
        check_merge(earlier, discordances, args.builds, args.seed)
    start = time.perf_counter()
    by_discordance = {}
    for discordance in discordances:
        by_discordance[discordance] = {}
        for name in names:
            print(f"discordance {discordance}: {name}", file=sys.stderr, flush=True)
            by_discordance[discordance][name] = evaluate(DESIGNS[name], discordance, args.builds, args.seed)
    by_key = {f"{d:g}": designs for d, designs in by_discordance.items()}
    seconds = round(time.perf_counter() - start, 1)
    merged_from, primary_discordance = None, discordances[0]
    if earlier is not None:  # the earlier run's primary setting stays the one the rule judges
        by_key = merge(earlier, by_key)
        merged_from = {"path": str(args.merge), "seconds": earlier.get("seconds"), "designs_run_now": names}
        primary_discordance = earlier["primary_discordance"]
    primary = by_key[f"{primary_discordance:g}"]
    result = {
        "default": choose_default(primary, {name: DESIGNS[name] for name in primary}), "rule": DEFAULT_RULE,
        "primary_discordance": primary_discordance, "builds": args.builds, "seed": args.seed,
        "designs": primary, "by_discordance": by_key,
        "figure": str(figure({float(d): designs for d, designs in by_key.items()}, args.figure)),
        "seconds": seconds, "merged_from": merged_from,
    }
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
