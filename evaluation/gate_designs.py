"""Calibration designs for `align build`'s gate: which candidates, which items, which rule.

A design is a value (`GateDesign`): its name, the candidates it searches, whether one
configuration is shared across languages, the fewest calibration items per language it can
use, and `decide`, which maps each language's calibration evidence to a `GateDecision`.
Every design is built on the selection code of `evaluation.calibration` (`choose_serving`,
`choose_across_languages`) and the paired bootstrap of `evaluation.stats`.
`evaluation.gate_power` simulates them; docs/benchmarks.md ("Gate power") compares them
under a rule written before they were run.

Designs:
- current: `GATE_RULE` per language (24 candidates, 5-fold CV, 95% CI of the CV gain above 0).
- few: the same rule over 4 candidates (alpha +-0.5, +-1 on the middle third, last position).
- single: the same rule over one pre-chosen candidate (the per-language ceiling: no selection).
- pooled: one configuration across languages. Each language is steered with the candidate
  best on the *other* languages (`choose_across_languages`), so its own items are an honest test
  of it; steering needs (a) that candidate to beat plain on all languages' items together (exact
  McNemar, one-sided 2.5% divided by the number of candidates: it was chosen on those items), and
  (b) the language's own items ruling out, one-sided at 95%, a loss of more than `HARM_MARGIN`
  (Tango's score test, `evaluation.stats.noninferiority_p`).
  (Testing the mean of the held-out gains instead is not valid: a language's gain and another's
  are correlated through the choices each made on the other, and that test adopts ~10% at gain 0.)
- shrinkage: the same held-out gains, each shrunk toward their mean (empirical Bayes,
  DerSimonian-Laird); a language is steered when its posterior 95% interval is above 0.
- carry: `GATE_RULE` on a larger labelled set of the same language (XNLI dev: 2,490 items),
  then check (b) of `pooled` on the target task's items with the configuration carried over.
- sequential: `pooled` run as a two-look group-sequential test (`SEQUENTIAL_LOOKS`: after the first
  half of each language's items, and after all), each test's level spent over the two looks by an
  O'Brien-Fleming-type spending function (`obf_levels`); scoring stops after the first half when
  every language is settled there (see `_sequential`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import norm

from alignment.artifact import ServingDefaults
from evaluation.calibration import (
    CALIBRATION_FOLDS,
    MIN_CALIBRATION_ITEMS,
    ServingChoice,
    choose_across_languages,
    choose_serving,
    search_space,
)
from evaluation.stats import mcnemar_exact, noninferiority_p

HARM_MARGIN = 0.03  # the harmed language: -3 points; steering must rule out a loss this large
HARM_LEVEL = 0.05  # one-sided: the harmed language's share of builds that may still steer it
POOLED_LEVEL = 0.025  # one-sided, as the lower end of a 95% interval
SHARED_RESAMPLES = 2000  # bootstrap resamples of the new designs (the current gate keeps its 10000)
MIN_PROXY_ITEMS = 500  # below this a proxy set has no more power than the target's own items
REFERENCE_GAIN = 0.036  # INCLINE's XCOPA average (7B model): the gain the gate should be able to see
REFERENCE_DISCORDANCE = 0.15  # share of XCOPA items that change answer when steered (docs/benchmarks.md)
SEQUENTIAL_LOOKS = (0.5, 1.0)  # the `sequential` design's looks: shares of each language's items scored


@dataclass(frozen=True)
class Evidence:
    """One language's calibration: per-item correctness of the plain run and of each candidate."""

    plain: np.ndarray  # [n] bool
    correct: Mapping[ServingDefaults, np.ndarray]  # candidate -> [n] bool, the same items
    proxy: Evidence | None = None  # a larger labelled set of the same language (another task)

    @property
    def items(self) -> int:
        return int(np.size(self.plain))

    def discordance(self) -> float:
        """Mean share of items whose answer a candidate changes (0 when nothing changed)."""
        return float(np.mean([np.mean(row != self.plain) for row in self.correct.values()])) if self.correct else 0.0


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict for one language; `config` is what a request naming only the language gets."""

    adopted: bool
    config: ServingDefaults | None
    delta: float  # the honest gain the verdict rests on (held-out, or on the target items)
    reason: str
    choice: ServingChoice | None = None  # GATE_RULE's whole outcome, for the per-language designs
    # What the verdict needed scored (None: everything): the language's items scored under any condition, and
    # its (item, condition) scorings, of items x (candidates + plain). Only a sequential design stops early.
    items_scored: int | None = None
    scorings: int | None = None


@dataclass(frozen=True)
class GateDesign:
    """A calibration design: its candidates, whether it shares one configuration, and its rule."""

    name: str
    summary: str
    space: Callable[[list[int]], list[ServingDefaults]]  # the candidates for an artifact with these layers
    shared: bool
    min_items: int
    rule: Callable[[GateDesign, Mapping[str, Evidence]], dict[str, GateDecision]] = field(repr=False)
    uses_proxy: bool = False  # reads `Evidence.proxy`, a larger labelled set of another task
    looks: tuple[float, ...] = (1.0,)  # shares of the items at which it decides; more than one: it can stop early

    def check(self, items: Mapping[str, int], discordance: Mapping[str, float] | None = None) -> None:
        """Refuse calibrations this design cannot use (`items`: each language's number of items), saying why;
        `align build` calls it before anything slow, without a discordance yet (REFERENCE_DISCORDANCE then)."""
        if self.shared and len(items) < 2:
            raise ValueError(f"design {self.name!r} shares one configuration across languages and needs 2 or more; "
                             f"got {len(items)} ({', '.join(items)}): use 'current' for a single language")
        pooled_items = sum(items.values()) if self.shared else None
        for language, n in items.items():
            if n < self.min_items:
                d = (discordance or {}).get(language) or REFERENCE_DISCORDANCE
                power = approximate_power(pooled_items or n, d)
                raise ValueError(
                    f"design {self.name!r}: {language} has {n} calibration items, the minimum is "
                    f"{self.min_items}; at {n} items a gain of {100 * REFERENCE_GAIN:+.1f} points would be "
                    f"adopted with probability at most {power:.0%}")

    def check_proxy(self, items: Mapping[str, int | None]) -> None:
        """Refuse proxy sets a proxy design cannot use (`items`: each language's proxy items, None: no proxy set)."""
        if not self.uses_proxy:
            raise ValueError(f"design {self.name!r} reads no proxy set")
        for language, n in items.items():
            if n is None or n < MIN_PROXY_ITEMS:
                raise ValueError(f"design {self.name!r}: {language} needs a labelled set of at least {MIN_PROXY_ITEMS} "
                                 f"items of another task (XNLI dev has 2,490); got {n or 0}")

    def decide(self, evidence: Mapping[str, Evidence]) -> dict[str, GateDecision]:
        """Each language's verdict; refuses evidence this design cannot use, saying why."""
        self.check({language: e.items for language, e in evidence.items()},
                   {language: e.discordance() for language, e in evidence.items()})
        return self.rule(self, evidence)


def approximate_power(items: int, discordance: float, gain: float = REFERENCE_GAIN) -> float:
    """Normal-approximation power of one pre-chosen configuration's paired test (CI above 0), an upper bound:
    the standard error of a paired accuracy difference is sqrt(discordance / items)."""
    return float(norm.cdf(gain / np.sqrt(max(discordance, 1e-9) / items) - 1.96))


def _restrict(correct: Mapping[ServingDefaults, np.ndarray], space: list[ServingDefaults]) -> dict:
    missing = [c.describe() for c in space if c not in correct]
    if missing:
        raise ValueError(f"calibration evidence lacks candidates {missing}")
    return {c: correct[c] for c in space}


def _layers(evidence: Mapping[str, Evidence]) -> list[int]:
    """The artifact's layers, read off the candidates (the layer set 'all' is the widest one)."""
    return sorted(max((c.layers for e in evidence.values() for c in e.correct), key=len))


def _rules_out_harm(plain: np.ndarray, steered: np.ndarray) -> bool:
    """Do the language's own items rule out a loss above HARM_MARGIN (one-sided, level HARM_LEVEL)?"""
    return noninferiority_p(plain, steered, HARM_MARGIN) < HARM_LEVEL


def _per_language(design: GateDesign, evidence: Mapping[str, Evidence],
                  resamples: int = 10000) -> dict[str, GateDecision]:
    space = design.space(_layers(evidence))
    decisions = {}
    for language, e in evidence.items():
        choice = choose_serving(_restrict(e.correct, space), e.plain, resamples=resamples)
        delta = choice.cross_validated_accuracy - choice.plain_accuracy
        decisions[language] = GateDecision(choice.adopted, choice.config, delta,
                                           f"cross-validated gain 95% CI [{choice.delta_ci95[0]:+.3f}, "
                                           f"{choice.delta_ci95[1]:+.3f}]", choice)
    return decisions


def _held_out_by_language(design: GateDesign, evidence: Mapping[str, Evidence]) -> dict[str, ServingDefaults]:
    """Per language, the candidate best on the other languages (so its own items test it honestly)."""
    space = design.space(_layers(evidence))
    gains = {language: {c: float(e.correct[c].mean() - e.plain.mean()) for c in _restrict(e.correct, space)}
             for language, e in evidence.items()}
    return choose_across_languages(gains)


def _pooled_p(evidence: Mapping[str, Evidence], candidate: ServingDefaults) -> float:
    """One-sided exact McNemar p of `candidate` beating plain on all languages' items together (1 when it is
    not ahead: more items right only under it than only plain)."""
    plain = np.concatenate([e.plain for e in evidence.values()])
    steered = np.concatenate([e.correct[candidate] for e in evidence.values()])
    test = mcnemar_exact(plain, steered)
    return test["p"] / 2 if test["intervened_only"] > test["baseline_only"] else 1.0


def _helps_on_average(evidence: Mapping[str, Evidence], candidate: ServingDefaults, family: int) -> bool:
    """Does `candidate` beat plain on all languages' items together? Exact McNemar, one-sided at
    POOLED_LEVEL / `family` (Bonferroni over the candidates searched: the candidate was chosen on these items)."""
    return _pooled_p(evidence, candidate) < POOLED_LEVEL / family


def _pooled(design: GateDesign, evidence: Mapping[str, Evidence]) -> dict[str, GateDecision]:
    family = len(design.space(_layers(evidence)))
    chosen = _held_out_by_language(design, evidence)
    helps = {candidate: _helps_on_average(evidence, candidate, family) for candidate in set(chosen.values())}
    decisions = {}
    for language, e in evidence.items():
        candidate = chosen[language]
        steered = e.correct[candidate]
        delta = float(steered.mean() - e.plain.mean())
        if not helps[candidate]:
            reason = (f"{candidate.describe()} (best on the other languages) does not beat plain on all languages' "
                      f"items (one-sided p >= {POOLED_LEVEL:g} / {family})")
            decisions[language] = GateDecision(False, None, delta, reason)
        elif not _rules_out_harm(e.plain, steered):
            decisions[language] = GateDecision(False, None, delta, f"own items do not rule out a loss of "
                                                                   f"{100 * HARM_MARGIN:g} points (opted out)")
        else:
            decisions[language] = GateDecision(True, candidate, delta, f"{candidate.describe()} beats plain on all "
                                                                       "languages' items; no harm here")
    return decisions


def _shrinkage(design: GateDesign, evidence: Mapping[str, Evidence]) -> dict[str, GateDecision]:
    chosen = _held_out_by_language(design, evidence)
    differences = [e.correct[chosen[language]].astype(float) - e.plain for language, e in evidence.items()]
    deltas = np.array([d.mean() for d in differences])
    variances = np.array([max(d.var(ddof=1), 1.0 / d.size**2) / d.size for d in differences])  # no zero variance
    # DerSimonian-Laird: between-language variance tau^2 from the excess of Cochran's Q over its df.
    weights = 1 / variances
    fixed = np.sum(weights * deltas) / weights.sum()
    q = np.sum(weights * (deltas - fixed) ** 2)
    tau2 = max(0.0, (q - (len(deltas) - 1)) / (weights.sum() - np.sum(weights**2) / weights.sum()))
    random_weights = 1 / (variances + tau2)
    mean = np.sum(random_weights * deltas) / random_weights.sum()
    mean_variance = 1 / random_weights.sum()
    shrink = tau2 / (tau2 + variances)  # 0: all the way to the mean
    posterior_mean = shrink * deltas + (1 - shrink) * mean
    posterior_sd = np.sqrt(shrink * variances + (1 - shrink) ** 2 * mean_variance)
    decisions = {}
    for i, language in enumerate(evidence):
        low = posterior_mean[i] - 1.96 * posterior_sd[i]
        adopted = bool(low > 0)
        decisions[language] = GateDecision(adopted, chosen[language] if adopted else None, float(deltas[i]),
                                           f"posterior 95% interval lower end {low:+.3f} (tau {np.sqrt(tau2):.3f})")
    return decisions


def _carry(design: GateDesign, evidence: Mapping[str, Evidence]) -> dict[str, GateDecision]:
    space = design.space(_layers(evidence))
    design.check_proxy({language: None if e.proxy is None else e.proxy.items for language, e in evidence.items()})
    decisions = {}
    for language, e in evidence.items():
        choice = choose_serving(_restrict(e.proxy.correct, space), e.proxy.plain, resamples=SHARED_RESAMPLES)
        steered = e.correct[choice.config] if choice.adopted else e.plain
        delta = float(steered.mean() - e.plain.mean())
        proxy = (f"proxy ({e.proxy.items} items) cross-validated gain 95% CI [{choice.delta_ci95[0]:+.3f}, "
                 f"{choice.delta_ci95[1]:+.3f}]")
        if not choice.adopted:
            decisions[language] = GateDecision(False, None, delta, proxy + " not above 0")
        elif not _rules_out_harm(e.plain, steered):
            decisions[language] = GateDecision(False, None, delta, f"{proxy} above 0, but it does not carry: the "
                                                                   f"target items do not rule out a loss of "
                                                                   f"{100 * HARM_MARGIN:g} points")
        else:
            decisions[language] = GateDecision(True, choice.config, delta, f"{proxy} above 0; carries: the target "
                                                                           f"items rule out a loss of "
                                                                           f"{100 * HARM_MARGIN:g} points")
    return decisions


# ---- sequential: `pooled` with an interim look -------------------------------------------


@lru_cache(maxsize=None)
def obf_levels(alpha: float, fraction: float = SEQUENTIAL_LOOKS[0]) -> tuple[float, float]:
    """Nominal one-sided levels (p below which a look rejects) at an interim look after `fraction` of the
    information and at the final look, for a test of overall one-sided level `alpha`.

    Alpha spent by the Lan-DeMets O'Brien-Fleming-type function alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))
    (Lan & DeMets 1983, Biometrika 70:659; Jennison & Turnbull 2000, "Group Sequential Methods", ch. 7.2).
    Interim boundary c1 = Phi^-1(1 - alpha(t)); the final c2 solves P(Z1 < c1, Z2 >= c2) = alpha - alpha(t),
    (Z1, Z2) standard bivariate normal with correlation sqrt(t) (the score statistics of nested samples).
    No group-sequential library is installed (scipy has none), so the two-look case is computed here: by
    one-dimensional integration, exact to quadrature error. At alpha 0.025, t = 0.5 this gives the standard
    boundaries z = 2.963 and 1.969 (Jennison & Turnbull table 7.6 / gsDesign's sfLDOF)."""
    if not (0 < alpha < 0.5 and 0 < fraction < 1):
        raise ValueError(f"need 0 < alpha < 0.5 and 0 < fraction < 1, got {alpha}, {fraction}")
    spent = float(2 * norm.sf(norm.isf(alpha / 2) / np.sqrt(fraction)))
    c1 = norm.isf(spent)
    rho = np.sqrt(fraction)

    def both_cross(c2: float) -> float:  # P(Z1 >= c1, Z2 >= c2)
        return quad(lambda z1: norm.pdf(z1) * norm.sf((c2 - rho * z1) / np.sqrt(1 - rho**2)), c1, np.inf,
                    epsabs=1e-14, epsrel=1e-10)[0]

    c2 = brentq(lambda c2: norm.sf(c2) - both_cross(c2) - (alpha - spent), 0.0, 10.0, xtol=1e-12)
    return spent, float(norm.sf(c2))


def _first(evidence: Evidence, items: int) -> Evidence:
    return Evidence(evidence.plain[:items], {c: row[:items] for c, row in evidence.correct.items()})


def _sequential(design: GateDesign, evidence: Mapping[str, Evidence]) -> dict[str, GateDecision]:
    """`pooled`'s two tests run group-sequentially, looks after the first half of each language's items and all.

    (a) Each candidate's "beats plain on all languages' items" test is a two-look test at level
    POOLED_LEVEL / family (Bonferroni as in `pooled`; `obf_levels` splits it between the looks). The candidate for
    a language is chosen on the other languages at the look (held out, as `pooled`); the union bound covers any
    choice at either look, since each candidate's own two-look test holds its level.
    (b) The harm check is a two-look test at HARM_LEVEL of the candidate steering the language: it passes if the
    first half of its items rule out a loss of HARM_MARGIN at the interim level, or all its items at the final one.
    Interim look (first half of every language's items, under every candidate): a language is *settled* if its
    candidate crossed (a)'s interim boundary, or if that candidate is not ahead of plain there (futility: it stays
    off; stopping for futility only lowers (a)'s rejections, so it needs no level of its own). If every language
    is settled, scoring under all candidates stops: a language whose candidate crossed is steered if the half
    rules out harm, and otherwise its other half is scored under plain and that candidate only for (b)'s final
    look. If any language is unsettled, every item is scored under every candidate and the final look decides
    every language whose candidate did not cross at the interim (futility is not binding) as `pooled` does (choice
    on all items, (a) at the final level); one whose candidate crossed keeps it, with (b) at both looks."""
    space = design.space(_layers(evidence))
    family = len(space)
    conditions = family + 1  # the candidates and plain
    interim_level, final_level = obf_levels(POOLED_LEVEL / family)
    harm_interim, harm_final = obf_levels(HARM_LEVEL)
    half = {language: e.items // 2 for language, e in evidence.items()}
    interim = {language: _first(e, half[language]) for language, e in evidence.items()}
    chosen = _held_out_by_language(design, interim)
    p_interim = {candidate: _pooled_p(interim, candidate) for candidate in set(chosen.values())}
    crossed = {language for language in evidence if p_interim[chosen[language]] < interim_level}
    futile = {language for language in evidence if p_interim[chosen[language]] == 1.0}

    def no_harm(language: str, candidate: ServingDefaults, final: bool) -> bool:
        e, h = evidence[language], half[language]
        if noninferiority_p(e.plain[:h], e.correct[candidate][:h], HARM_MARGIN) < harm_interim:
            return True
        return final and noninferiority_p(e.plain, e.correct[candidate], HARM_MARGIN) < harm_final

    decisions = {}
    if crossed | futile == set(evidence):  # every language settled: scoring under all candidates stops here
        for language, e in evidence.items():
            candidate, h = chosen[language], half[language]
            delta = float(interim[language].correct[candidate].mean() - interim[language].plain.mean())
            if language in futile:
                decisions[language] = GateDecision(
                    False, None, delta, f"stopped at the interim look ({h} items): {candidate.describe()} (best on "
                                        "the other languages) is not ahead of plain on all languages' items",
                    items_scored=h, scorings=h * conditions)
            elif no_harm(language, candidate, final=False):
                decisions[language] = GateDecision(
                    True, candidate, delta, f"stopped at the interim look ({h} items): {candidate.describe()} beats "
                                            "plain on all languages' items; no harm here",
                    items_scored=h, scorings=h * conditions)
            else:  # the rest scored under plain and the candidate for (b)'s final look
                full = float(e.correct[candidate].mean() - e.plain.mean())
                scorings = h * conditions + (e.items - h) * 2
                if no_harm(language, candidate, final=True):
                    decisions[language] = GateDecision(
                        True, candidate, full, f"{candidate.describe()} beat plain on all languages' items at the "
                                               "interim look; no harm here on all items",
                        items_scored=e.items, scorings=scorings)
                else:
                    decisions[language] = GateDecision(
                        False, None, full, f"{candidate.describe()} beat plain on all languages' items at the "
                                           f"interim look; own items do not rule out a loss of "
                                           f"{100 * HARM_MARGIN:g} points (opted out)",
                        items_scored=e.items, scorings=scorings)
        return decisions

    final_chosen = _held_out_by_language(design, evidence)
    p_final = {candidate: _pooled_p(evidence, candidate) for candidate in set(final_chosen.values())}
    for language, e in evidence.items():
        scored = {"items_scored": e.items, "scorings": e.items * conditions}
        if language in crossed:
            candidate, look = chosen[language], "the interim look"
        else:  # futility is not binding: scoring went on, so the final look decides this language too
            candidate = final_chosen[language]
            look = "the final look" if p_final[candidate] < final_level else None
        if look is None:
            delta = float(e.correct[candidate].mean() - e.plain.mean())
            decisions[language] = GateDecision(False, None, delta, f"{candidate.describe()} (best on the other "
                                                                   f"languages) does not beat plain on all "
                                                                   f"languages' items at either look", **scored)
            continue
        delta = float(e.correct[candidate].mean() - e.plain.mean())
        if no_harm(language, candidate, final=True):
            decisions[language] = GateDecision(True, candidate, delta, f"{candidate.describe()} beats plain on all "
                                                                       f"languages' items ({look}); no harm here",
                                               **scored)
        else:
            decisions[language] = GateDecision(False, None, delta, f"own items do not rule out a loss of "
                                                                   f"{100 * HARM_MARGIN:g} points (opted out)",
                                               **scored)
    return decisions


def _middle_third(layers: list[int]) -> tuple[int, ...]:
    third = max(1, len(layers) // 3)
    return tuple(sorted(layers)[third: len(layers) - third] or sorted(layers))


def few_space(layers: list[int]) -> list[ServingDefaults]:
    """Four candidates: the middle of the stack recurred in every choice so far (docs/benchmarks.md)."""
    return [c for c in search_space(layers) if c.layers == _middle_third(layers) and c.positions == "last"]


def single_space(layers: list[int]) -> list[ServingDefaults]:
    """One pre-chosen candidate: alpha +0.5 on the middle third, last position."""
    return [ServingDefaults(alpha=0.5, layers=_middle_third(layers), positions="last")]


DESIGNS: dict[str, GateDesign] = {design.name: design for design in (
    GateDesign("current", f"GATE_RULE per language: 24 candidates, {CALIBRATION_FOLDS}-fold CV, CI above 0",
               search_space, shared=False, min_items=MIN_CALIBRATION_ITEMS, rule=_per_language),
    GateDesign("few", "GATE_RULE per language over 4 candidates (alpha +-0.5, +-1; middle third; last)",
               few_space, shared=False, min_items=MIN_CALIBRATION_ITEMS, rule=_per_language),
    GateDesign("single", "one pre-chosen candidate per language, its 95% CI above 0",
               single_space, shared=False, min_items=MIN_CALIBRATION_ITEMS, rule=_per_language),
    GateDesign("pooled", "candidate best on the other languages; it beats plain on all languages' items (exact "
               "McNemar, Bonferroni over candidates); a language whose own items do not rule out a 3-point loss "
               "stays off",
               search_space, shared=True, min_items=MIN_CALIBRATION_ITEMS, rule=_pooled),
    GateDesign("shrinkage", "candidate best on the other languages; empirical-Bayes posterior 95% interval above 0",
               search_space, shared=True, min_items=MIN_CALIBRATION_ITEMS, rule=_shrinkage),
    GateDesign("carry", "GATE_RULE on 2,490 XNLI dev items of the language; carried to the target, harm check",
               search_space, shared=False, min_items=MIN_CALIBRATION_ITEMS, rule=_carry, uses_proxy=True),
    GateDesign("sequential", "pooled as a two-look group-sequential test (after half of each language's items, "
               "O'Brien-Fleming-type alpha spending); stops scoring at the half when every language is settled",
               search_space, shared=True, min_items=2 * MIN_CALIBRATION_ITEMS, rule=_sequential,
               looks=SEQUENTIAL_LOOKS),
)}
# `align build`'s design for two or more languages: the one `gate_power.DEFAULT_RULE` (written before the comparison)
# picks from `bench/gate_power.py`'s run (docs/benchmarks.md, "Gate power"). `sequential` tied `pooled` within Monte
# Carlo error and won on the rule's last tie-break, the higher adoption at +3.6 (0.8264 vs 0.8261, same draws).
DEFAULT_SHARED_DESIGN = "sequential"
