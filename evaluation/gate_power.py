"""The gate's operating characteristic: how often a design adopts steering, as a function of the true gain.

Model of one simulated build, per language (the item is the unit, as in the gate):
- plain correctness of each of n items: Bernoulli(plain accuracy), at the language's measured
  plain accuracy (XCOPA validation, Gemma 3 270M, docs/benchmarks.md);
- each candidate changes an item's answer with probability `discordance` (the share of items
  that change answer under steering) and gains `gain` on average: among changed items, plain-right
  ones are lost at rate (d - g) / 2 and plain-wrong ones won at (d + g) / 2 (per item), so the
  expected accuracy difference is g and the changed share is d (d is raised to |g| when smaller);
- candidates change items independently of one another. Real candidates overlap (alpha +0.5 and
  +1 on the same layers move many of the same items), so independence gives the selection the
  most chances to be fooled: power read off it is a lower bound, and false adoption is still
  held by the held-out test;
- one candidate (alpha +0.5, middle third of the layers, last position: in every design's set)
  has the true gain; the other 23 have min(gain, 0): nothing else helps, and when the good one
  hurts, nothing helps. A harmed language has every candidate at its (negative) gain.
- a proxy set (the `carry` design) is drawn the same way at its own size, accuracy and
  discordance, with the same gains unless `proxy_gains` says otherwise (a gain that does not carry).

Every simulated build goes through the design's real `decide`. Builds use fixed seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import cycle, islice

import numpy as np

from alignment.artifact import ServingDefaults
from evaluation.calibration import search_space
from evaluation.gate_designs import Evidence, GateDesign

# Plain accuracy per XCOPA language, `align build` calibration (100 validation items each, docs/benchmarks.md).
XCOPA_PLAIN = {"sw": 0.54, "tr": 0.51, "zh": 0.66, "et": 0.63, "ht": 0.57, "ta": 0.55, "id": 0.49, "vi": 0.65,
               "it": 0.63, "qu": 0.47, "th": 0.59}
# Share of items that change answer under steering, from the evidence in docs/benchmarks.md and docs/alignment.md.
DISCORDANCE = {
    "ridge downstream check, all items (48 / 800)": 0.06,
    "XCOPA items actually steered (bench 91 / 550; ridge check 48 / 350)": 0.15,
    "th XNLI held-out check (412 / 1,200)": 0.34,
}
LAYERS = list(range(18))  # Gemma 3 270M
GOOD = ServingDefaults(alpha=0.5, layers=tuple(range(6, 12)), positions="last")


@dataclass(frozen=True)
class Setting:
    """The calibration data of a simulated build (XCOPA-sized by default) and its proxy set."""

    items: int = 100
    discordance: float = 0.06
    plain: tuple[float, ...] = tuple(XCOPA_PLAIN.values())
    proxy_items: int = 2490  # XNLI dev
    proxy_discordance: float = 0.34
    proxy_plain: float = 0.37


def draw_correct(rng: np.random.Generator, builds: int, items: int, plain_accuracy: float, discordance: float,
                 gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain [builds, items] and candidates' [builds, candidates, items] correctness with these true gains."""
    gains = np.asarray(gains, float)
    lose, win = flip_rates(plain_accuracy, discordance, gains)
    plain = rng.random((builds, items)) < plain_accuracy
    flip = rng.random((builds, gains.size, items)) < np.where(plain[:, None, :], lose[:, None], win[:, None])
    return plain, plain[:, None, :] ^ flip


def flip_rates(plain_accuracy: float, discordance: float, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(change | plain right) and P(change | plain wrong) that give these gains at this discordance."""
    changed = np.maximum(discordance, np.abs(gains))
    lose = (changed - gains) / 2 / plain_accuracy
    win = (changed + gains) / 2 / (1 - plain_accuracy)
    if np.any(lose > 1) or np.any(win > 1):
        raise ValueError(f"discordance {discordance} and gains {gains} are impossible at plain accuracy "
                         f"{plain_accuracy}")
    return lose, win


def candidate_gains(gain: float, candidates: list[ServingDefaults], harmed: bool = False) -> np.ndarray:
    """True gain of each candidate: GOOD at `gain`, the others at min(gain, 0) (all at `gain` if harmed)."""
    return np.array([gain if c == GOOD or harmed else min(gain, 0.0) for c in candidates])


def simulate(design: GateDesign, setting: Setting, gains: Sequence[float], builds: int, seed: int,
             proxy_gains: Sequence[float] | None = None, progress: bool = False) -> np.ndarray:
    """Adoption [builds, languages] of `design` when language i's true gain is gains[i] (fractions, 0.036 = +3.6).

    A negative gain harms the language with every candidate; a positive or zero one is GOOD's alone.
    """
    return simulate_with_cost(design, setting, gains, builds, seed, proxy_gains, progress)[0]


def simulate_with_cost(design: GateDesign, setting: Setting, gains: Sequence[float], builds: int, seed: int,
                       proxy_gains: Sequence[float] | None = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`simulate`, with what each decision needed scored: (adoption, share of the language's items scored,
    share of its (item, condition) scorings), each [builds, languages]; 1 where the design scores everything."""
    if len(gains) > len(setting.plain):
        raise ValueError(f"{len(gains)} languages, but plain accuracies for only {len(setting.plain)}")
    candidates = search_space(LAYERS)
    rng = np.random.default_rng(seed)
    languages = list(XCOPA_PLAIN)[: len(gains)]
    proxy_gains = gains if proxy_gains is None else proxy_gains
    target, proxy = [], []
    for i, gain in enumerate(gains):
        target.append(draw_correct(rng, builds, setting.items, setting.plain[i], setting.discordance,
                                   candidate_gains(gain, candidates, harmed=gain < 0)))
        if design.uses_proxy:
            proxy.append(draw_correct(rng, builds, setting.proxy_items, setting.proxy_plain,
                                      setting.proxy_discordance,
                                      candidate_gains(proxy_gains[i], candidates, harmed=proxy_gains[i] < 0)))
    adopted = np.zeros((builds, len(gains)), dtype=bool)
    items, scorings = np.ones((builds, len(gains))), np.ones((builds, len(gains)))
    conditions = len(candidates) + 1
    for b in _progress(range(builds), progress, design.name):
        evidence = {}
        for i, language in enumerate(languages):
            plain, correct = target[i]
            proxy_evidence = (Evidence(proxy[i][0][b], dict(zip(candidates, proxy[i][1][b])))
                              if proxy else None)
            evidence[language] = Evidence(plain[b], dict(zip(candidates, correct[b])), proxy_evidence)
        decisions = design.decide(evidence)
        for i, language in enumerate(languages):
            decision = decisions[language]
            adopted[b, i] = decision.adopted
            if decision.items_scored is not None:
                items[b, i] = decision.items_scored / setting.items
            if decision.scorings is not None:
                scorings[b, i] = decision.scorings / (setting.items * conditions)
    return adopted, items, scorings


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def adoption_rate(adopted: np.ndarray, language: int | None = None) -> tuple[float, float]:
    """Adoption rate (of one language, or averaged over languages) and its Monte Carlo standard error.

    The build is the unit: languages of one build share the shared designs' choice, so they are not
    independent draws.
    """
    per_build = adopted[:, language].astype(float) if language is not None else adopted.mean(axis=1)
    return float(per_build.mean()), float(per_build.std(ddof=1) / np.sqrt(per_build.size))


def languages_for(design: GateDesign, languages: int) -> int:
    """A per-language design decides each language alone, and plain accuracy does not enter its decision
    (the b/c counts carry all of it): one language per build estimates every language's rate."""
    return languages if design.shared else 1


def operating_characteristic(design: GateDesign, setting: Setting, gains: Sequence[float], builds: int,
                             seed: int = 0, languages: int = 11, progress: bool = False) -> dict[float, tuple]:
    """gain -> (adoption rate per language, Monte Carlo SE), every language at that gain."""
    return {gain: (point["rate"], point["se"]) for gain, point in
            operating_characteristic_with_cost(design, setting, gains, builds, seed, languages, progress).items()}


def operating_characteristic_with_cost(design: GateDesign, setting: Setting, gains: Sequence[float], builds: int,
                                       seed: int = 0, languages: int = 11,
                                       progress: bool = False) -> dict[float, dict[str, float]]:
    """gain -> {rate, se (of the rate), items: mean share of each language's items scored, scorings: mean share of
    its (item, condition) scorings}; the same draws as `operating_characteristic` (same seed, same numbers)."""
    n = languages_for(design, languages)
    curve = {}
    for gain in gains:
        adopted, items, scorings = simulate_with_cost(design, setting, [gain] * n, builds, seed, progress=progress)
        rate, se = adoption_rate(adopted)
        curve[gain] = {"rate": rate, "se": se, "items": float(items.mean()), "scorings": float(scorings.mean())}
    return curve


def mixed_case(design: GateDesign, setting: Setting, builds: int, seed: int = 0, gain: float = 0.036,
               harm: float = -0.03, languages: int = 11, progress: bool = False) -> tuple[float, float]:
    """Adoption rate of the one harmed language while the others gain (the last language is the harmed one);
    for a proxy-set design, of a language harmed on the target task while the proxy shows the gain."""
    point = mixed_case_with_cost(design, setting, builds, seed, gain, harm, languages, progress)
    return point["rate"], point["se"]


def mixed_case_with_cost(design: GateDesign, setting: Setting, builds: int, seed: int = 0, gain: float = 0.036,
                         harm: float = -0.03, languages: int = 11, progress: bool = False) -> dict[str, float]:
    """`mixed_case` as {rate, se} of the harmed language, with {items, scorings}: the shares scored, averaged
    over all languages of the build (what the build cost), as in `operating_characteristic_with_cost`."""
    gains = [gain] * (languages_for(design, languages) - 1) + [harm]
    # A proxy-set design judges each language alone: its hard case is a gain on the proxy that does not carry.
    proxy_gains = [gain] * len(gains) if design.uses_proxy else None
    adopted, items, scorings = simulate_with_cost(design, setting, gains, builds, seed, proxy_gains, progress)
    rate, se = adoption_rate(adopted, language=-1)
    return {"rate": rate, "se": se, "items": float(items.mean()), "scorings": float(scorings.mean())}


def minimum_detectable_gain(design: GateDesign, items: int, discordance: float, power: float = 0.8,
                            builds: int = 200, seed: int = 0, languages: int = 11,
                            gains: Sequence[float] = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16),
                            curve: dict[float, tuple] | None = None) -> float:
    """The smallest true gain adopted with probability >= `power`, interpolated on a grid of gains
    (adoption rises with the gain); inf if even the largest gain of the grid falls short.
    `curve` (gain -> (rate, se)) reuses an operating characteristic already simulated for this setting."""
    if curve is None:
        setting = Setting(items=items, discordance=discordance)
        curve = operating_characteristic(design, setting, gains, builds, seed, languages)
    points = sorted((gain, rate) for gain, (rate, _) in curve.items() if gain >= 0)
    for (g0, r0), (gain, rate) in zip([(0.0, 0.0), *points], points):
        if rate >= power:
            return float(g0 + (gain - g0) * (power - r0) / (rate - r0)) if rate > r0 else float(gain)
    return float("inf")


# ---- what one `align build` could have detected -------------------------------------------

BUILD_GAINS = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16)  # the grid a build's minimum is interpolated on
# Simulated builds per gain: the Monte Carlo SE of a rate near 80% is sqrt(0.8 * 0.2 / 200) = 0.028, and a build's
# minimum takes at most 8 x 200 simulated decisions: ~10 s on one core for `current` (~7 ms each: 24 candidates,
# 10,000 bootstrap resamples), ~4 s for `pooled` over 11 languages (tests/test_gate_power.py times both).
BUILD_SIMULATIONS = 200


@dataclass(frozen=True)
class Detectable:
    """What a build's calibration could have detected: its discordance and minimum detectable gain (fractions;
    `gain` is None when even the largest gain of `BUILD_GAINS` the setting allows falls short of 80%)."""

    discordance: float
    gain: float | None
    largest_gain: float  # the largest gain simulated


def build_discordance(evidence: Mapping[str, Evidence]) -> float:
    """Share of calibration items whose correctness under a candidate differs from plain, averaged over the
    candidates and over all items of these languages (each language weighted by its items)."""
    items = sum(e.items for e in evidence.values())
    return sum(e.items * e.discordance() for e in evidence.values()) / items


def detectable_gain(design: GateDesign, evidence: Mapping[str, Evidence], power: float = 0.8,
                    builds: int = BUILD_SIMULATIONS, seed: int = 0) -> Detectable:
    """The minimum gain `design` detects at `power` on calibrations like `evidence`: as many languages (every one
    at the same true gain), the fewest items of any of them, the discordance they showed (`build_discordance`);
    plain accuracies are XCOPA's, as in the bench, so that a build's number and the bench's table agree.

    The curve is simulated upward along `BUILD_GAINS` and stops at the first gain reaching `power`; gains the
    setting cannot produce (`flip_rates`) end it. Cost: at most len(BUILD_GAINS) x `builds` decisions."""
    languages = len(evidence) if design.shared else 1
    discordance = build_discordance(evidence)
    setting = Setting(items=min(e.items for e in evidence.values()), discordance=discordance,
                      plain=tuple(islice(cycle(XCOPA_PLAIN.values()), languages)))
    proxies = [e.proxy for e in evidence.values() if e.proxy is not None]
    if design.uses_proxy and proxies:  # the proxy sets as they are: their size, discordance and plain accuracy
        setting = replace(setting, proxy_items=min(p.items for p in proxies),
                          proxy_discordance=build_discordance({str(i): p for i, p in enumerate(proxies)}),
                          proxy_plain=float(np.mean([p.plain.mean() for p in proxies])))
    curve: dict[float, tuple] = {}
    for gain in BUILD_GAINS:
        try:
            for plain in setting.plain:
                flip_rates(plain, discordance, np.array([gain]))
            if design.uses_proxy:
                flip_rates(setting.proxy_plain, setting.proxy_discordance, np.array([gain]))
        except ValueError:
            break  # a larger gain is impossible too
        curve.update(operating_characteristic(design, setting, [gain], builds, seed, languages))
        if curve[gain][0] >= power:
            break
    gain = minimum_detectable_gain(design, setting.items, discordance, power, curve=curve) if curve else np.inf
    return Detectable(discordance, None if np.isinf(gain) else gain, max(curve, default=0.0))


# Written before the comparison was run (docs/benchmarks.md, "Gate power").
DEFAULT_RULE = (
    "At the primary setting (100 items in each of 11 languages, discordance 0.06), a design qualifies if its "
    "adoption rate per language is <= 0.05 at a true gain of 0, <= 0.01 at -1 point, and <= 0.05 for the harmed "
    "language (-3 points) while the other 10 gain +3.6. Among qualifying designs the highest adoption at +3.6 wins; "
    "designs within two Monte Carlo standard errors of it tie, and ties go to fewer candidates, then to a "
    "per-language design. If no design qualifies, the default stays 'current'."
)
TARGETS = {"0": 0.05, "-1": 0.01, "mixed": 0.05}


def qualifies(result: dict) -> bool:
    """DEFAULT_RULE's no-harm targets, on the point estimates of `result['adoption']` and `result['mixed']`."""
    return all((result["mixed"] if key == "mixed" else result["adoption"][key]) <= limit
               for key, limit in TARGETS.items())


def choose_default(results: dict[str, dict], designs: dict[str, GateDesign]) -> str:
    """DEFAULT_RULE over `results[name] = {'adoption': {'+3.6', '0', '-1'}, 'mixed', 'mc_se': {'+3.6'}}`."""
    qualified = [name for name in results if qualifies(results[name])]
    if not qualified:
        return "current"
    best = max(qualified, key=lambda name: results[name]["adoption"]["+3.6"])
    top = results[best]["adoption"]["+3.6"]
    tied = [name for name in qualified
            if results[name]["adoption"]["+3.6"] >= top - 2 * results[name]["mc_se"]["+3.6"]]
    return min(tied, key=lambda name: (len(designs[name].space(LAYERS)), designs[name].shared,
                                       -results[name]["adoption"]["+3.6"]))
