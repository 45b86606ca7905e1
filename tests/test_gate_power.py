"""The gate's designs and their simulated operating characteristic (fixed seeds, XCOPA-sized data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.calibration import search_space
from alignment.artifact import Evidence as ManifestEvidence
from evaluation.gate_designs import DESIGNS, Evidence, GateDecision
from evaluation.stats import noninferiority_p
from evaluation.gate_power import (
    LAYERS,
    Detectable,
    Setting,
    build_discordance,
    choose_default,
    detectable_gain,
    draw_correct,
    minimum_detectable_gain,
    mixed_case,
    operating_characteristic,
)

XCOPA = Setting(items=100, discordance=0.06)  # the primary setting: 11 languages x 100 items


def test_draws_have_the_planted_gain_and_discordance():
    rng = np.random.default_rng(0)
    plain, correct = draw_correct(rng, 2000, 100, 0.57, 0.15, np.array([0.036, 0.0, -0.03]))
    differences = correct.astype(float) - plain[:, None, :]
    np.testing.assert_allclose(differences.mean(axis=(0, 2)), [0.036, 0.0, -0.03], atol=0.002)
    np.testing.assert_allclose((differences != 0).mean(axis=(0, 2)), [0.15, 0.15, 0.15], atol=0.002)


def test_impossible_gain_for_the_accuracy_is_refused():
    with pytest.raises(ValueError, match="impossible"):
        draw_correct(np.random.default_rng(0), 1, 10, 0.97, 0.2, np.array([-0.1]))


@pytest.mark.parametrize("discordance", [0.06, 0.15])
def test_harm_check_holds_its_level_with_few_discordant_items(discordance):
    """At a true loss of exactly the margin, harm is ruled out in at most ~5% of draws (the bootstrap did 6.5%)."""
    plain, correct = draw_correct(np.random.default_rng(3), 2000, 100, 0.57, discordance, np.array([-0.03]))
    rejected = np.mean([noninferiority_p(p, c[0], 0.03) < 0.05 for p, c in zip(plain, correct)])
    assert rejected <= 0.055


def test_harm_check_separates_a_gain_from_a_loss():
    plain = np.zeros(100, bool)
    gained, lost = plain.copy(), plain.copy()
    gained[:5] = True
    plain_lost = plain.copy()
    plain_lost[:6], lost[6] = True, True
    assert noninferiority_p(plain, gained, 0.03) < 0.01
    assert noninferiority_p(plain_lost, lost, 0.03) > 0.5


def test_pooled_adopts_a_planted_gain():
    rate, _ = operating_characteristic(DESIGNS["pooled"], XCOPA, [0.036], builds=200, seed=11)[0.036]
    assert rate >= 0.8


def test_current_gate_rarely_adopts_the_same_gain():
    """Why the default changes: one language's 100 items cannot show +3.6 points."""
    rate, _ = operating_characteristic(DESIGNS["current"], XCOPA, [0.036], builds=200, seed=11)[0.036]
    assert rate < 0.4


@pytest.mark.parametrize("gain, limit", [(0.0, 0.05), (-0.01, 0.01)])
def test_pooled_does_not_adopt_a_planted_zero_or_loss(gain, limit):
    rate, _ = operating_characteristic(DESIGNS["pooled"], XCOPA, [gain], builds=200, seed=12)[gain]
    assert rate <= limit


def test_pooled_leaves_a_harmed_language_off_while_the_others_gain():
    rate, _ = mixed_case(DESIGNS["pooled"], XCOPA, builds=400, seed=13)
    assert rate <= 0.05


def test_shrinkage_drags_a_harmed_language_along():
    """The mixed case can fail: shrinkage toward the mean steers the -3 language far more than 5% of the time."""
    rate, _ = mixed_case(DESIGNS["shrinkage"], XCOPA, builds=200, seed=13)
    assert rate > 0.1


def _evidence(items: int, languages: int, seed: int = 0, discordance: float = 0.15) -> dict[str, Evidence]:
    rng = np.random.default_rng(seed)
    candidates = search_space(LAYERS)
    evidence = {}
    for language in ["sw", "tr", "zh", "et", "ht", "ta", "id", "vi", "it", "qu", "th"][:languages]:
        plain, correct = draw_correct(rng, 1, items, 0.55, discordance, np.zeros(len(candidates)))
        evidence[language] = Evidence(plain[0], dict(zip(candidates, correct[0])))
    return evidence


@pytest.mark.parametrize("name", ["current", "pooled"])
def test_too_few_items_are_refused_naming_the_minimum_and_the_power(name):
    with pytest.raises(ValueError, match=r"the minimum is 40; .* probability at most \d+%"):
        DESIGNS[name].decide(_evidence(items=30, languages=2))


def test_a_shared_design_refuses_one_language():
    with pytest.raises(ValueError, match="shares one configuration across languages and needs 2 or more"):
        DESIGNS["pooled"].decide(_evidence(items=100, languages=1))


def test_carry_refuses_without_a_larger_labelled_set():
    with pytest.raises(ValueError, match="at least 500 items"):
        DESIGNS["carry"].decide(_evidence(items=100, languages=1))


def test_decisions_name_a_configuration_only_when_adopted():
    decisions = DESIGNS["pooled"].decide(_evidence(items=100, languages=3))
    assert set(decisions) == {"sw", "tr", "zh"}
    assert all((d.config is not None) == d.adopted for d in decisions.values())


def _result(plus: float, zero: float, minus: float, mixed: float, se: float = 0.01) -> dict:
    return {"adoption": {"+3.6": plus, "0": zero, "-1": minus}, "mixed": mixed, "mc_se": {"+3.6": se}}


def test_default_rule_takes_the_most_powerful_design_meeting_the_no_harm_targets():
    results = {"current": _result(0.2, 0.03, 0.0, 0.0), "shrinkage": _result(0.95, 0.04, 0.0, 0.3),
               "pooled": _result(0.85, 0.02, 0.0, 0.04), "carry": _result(0.6, 0.0, 0.0, 0.0)}
    assert choose_default(results, DESIGNS) == "pooled"
    # Within two Monte Carlo errors: the design with fewer candidates wins the tie.
    results["few"] = _result(0.84, 0.02, 0.0, 0.0)
    assert choose_default(results, DESIGNS) == "few"
    assert choose_default({"shrinkage": _result(0.95, 0.2, 0.0, 0.3)}, DESIGNS) == "current"


def test_minimum_detectable_gain_interpolates_the_curve():
    curve = {0.0: (0.02, 0.0), 0.02: (0.5, 0.0), 0.04: (0.9, 0.0)}
    assert minimum_detectable_gain(DESIGNS["current"], 100, 0.06, curve=curve) == pytest.approx(0.035)
    assert minimum_detectable_gain(DESIGNS["current"], 100, 0.06, curve={0.02: (0.5, 0.0)}) == float("inf")


def test_bench_prints_the_operating_characteristic_as_json(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import gate_power

    figure = tmp_path / "oc.png"
    assert gate_power.main(["--json", "--builds", "4", "--designs", "single,pooled", "--discordance", "0.06",
                            "--figure", str(figure)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["default"] in {"single", "pooled", "current"}
    assert set(result["designs"]) == {"single", "pooled"}
    assert set(result["designs"]["pooled"]["adoption"]) == {"+3.6", "0", "-1"}
    assert figure.stat().st_size > 0
    sys.modules.pop("gate_power")


# ---- what one `align build` could have detected ----------------------------------------------


def test_a_builds_minimum_detectable_gain_agrees_with_the_bench():
    """100 items in each of 11 languages at d = 0.06: the bench's table says 3.5 points for pooled (400 builds)."""
    detectable = detectable_gain(DESIGNS["pooled"], _evidence(items=100, languages=11, discordance=0.06))
    assert detectable.discordance == pytest.approx(0.06, abs=0.01)
    assert detectable.gain == pytest.approx(0.035, abs=0.005)


def test_one_language_can_detect_far_less_than_eleven():
    one = detectable_gain(DESIGNS["current"], _evidence(items=100, languages=1, discordance=0.06))
    assert one.gain == pytest.approx(0.093, abs=0.015)  # the bench: 9.3 points


def test_a_discordance_no_gain_of_the_grid_survives_gives_no_minimum():
    """At d = 0.85 a plain accuracy of 0.54 cannot produce +8 points; nothing below reaches 80%."""
    detectable = detectable_gain(DESIGNS["current"], _evidence(items=40, languages=1, discordance=0.85))
    assert detectable.gain is None and 0 < detectable.largest_gain < 0.08


def test_build_discordance_weights_languages_by_their_items():
    evidence = _evidence(items=50, languages=2)
    evidence["sw"] = Evidence(np.zeros(150, bool), {c: np.ones(150, bool) for c in evidence["sw"].correct})
    assert build_discordance(evidence) == pytest.approx((150 * 1.0 + 50 * evidence["tr"].discordance()) / 200)


def test_the_off_sentence_rounds_the_minimum_to_a_tenth_of_a_point():
    from evaluation.serving_defaults import decision_wording

    off = GateDecision(False, None, 0.0, "no")
    assert decision_wording(off, Detectable(0.1, 0.06849, 0.08)) == (
        "off: no gain detectable; this calibration could only have detected gains above 6.8 points")
    assert decision_wording(off, Detectable(0.6, None, 0.16)).endswith("gains above 16.0 points")


def test_evidence_from_before_the_designs_still_loads():
    older = dict(task="xcopa", file="val.sw.jsonl", items=100, plain_accuracy=0.5, cross_validated_accuracy=0.5,
                 delta=0.0, delta_ci95=[-0.05, 0.05], adopted=False, fold_choices=[], candidate_accuracy={},
                 rule="...", date="today", engine={}, summary="gate not cleared")
    evidence = ManifestEvidence.model_validate(older)
    assert (evidence.design, evidence.minimum_detectable_gain, evidence.decision) == (None, None, None)
    written = ManifestEvidence.model_validate({**older, "design": "pooled", "minimum_detectable_gain": 6.8,
                                               "discordance": 0.15, "decision": "off: ...", "delta_ci95": None})
    assert ManifestEvidence.model_validate_json(written.model_dump_json()) == written
