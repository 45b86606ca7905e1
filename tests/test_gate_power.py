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


# ---- sequential: pooled with an interim look ---------------------------------------------


def test_obrien_fleming_levels_match_the_standard_two_look_boundaries():
    """Lan-DeMets O'Brien-Fleming-type spending, looks at 1/2 and 1, one-sided 0.025: z = 2.963 and 1.969."""
    from scipy.stats import norm

    from evaluation.gate_designs import obf_levels

    interim, final = obf_levels(0.025)
    assert norm.isf(interim) == pytest.approx(2.963, abs=0.001)
    assert norm.isf(final) == pytest.approx(1.969, abs=0.001)
    # The levels spend no more than the whole: the final nominal level is below the one-look test's.
    for alpha in (0.05, 0.025 / 24):
        interim, final = obf_levels(alpha)
        assert interim < final < alpha


def _planted(languages: int, items: int, plain_right: np.ndarray, steered_right: np.ndarray) -> dict[str, Evidence]:
    candidates = search_space(LAYERS)
    return {language: Evidence(plain_right.copy(), {c: steered_right.copy() for c in candidates})
            for language in ["sw", "tr", "zh", "et", "ht", "ta", "id", "vi", "it", "qu", "th"][:languages]}


def test_sequential_stops_at_the_half_when_every_language_is_settled():
    items = 100
    plain = np.zeros(items, bool)
    steered = np.arange(items) % 3 == 0  # +33 points in both halves: crosses (a) and rules out harm at the interim
    decisions = DESIGNS["sequential"].decide(_planted(3, items, plain, steered))
    assert all(d.adopted and d.items_scored == 50 and d.scorings == 50 * 25 for d in decisions.values())
    assert all("interim look" in d.reason for d in decisions.values())
    # Every candidate loses items: not ahead at the interim, so the build stops there for futility.
    decisions = DESIGNS["sequential"].decide(_planted(3, items, steered, plain))
    assert all(not d.adopted and d.items_scored == 50 for d in decisions.values())


def test_sequential_goes_on_when_the_interim_look_settles_nothing():
    items = 100
    plain = np.zeros(items, bool)
    steered = np.zeros(items, bool)
    steered[[10, 60]] = True  # ahead, but far from the interim boundary
    decisions = DESIGNS["sequential"].decide(_planted(3, items, plain, steered))
    assert all(not d.adopted and d.items_scored == items and d.scorings == items * 25 for d in decisions.values())


def test_sequential_holds_the_pooled_targets_and_keeps_its_power():
    sequential = DESIGNS["sequential"]
    for gain, limit in ((0.0, 0.05), (-0.01, 0.01)):
        rate, _ = operating_characteristic(sequential, XCOPA, [gain], builds=200, seed=12)[gain]
        assert rate <= limit
    assert mixed_case(sequential, XCOPA, builds=400, seed=13)[0] <= 0.05  # as pooled's check: same draws
    rate, _ = operating_characteristic(sequential, XCOPA, [0.036], builds=200, seed=11)[0.036]
    assert rate >= 0.75


def test_the_cost_curve_has_the_same_draws_as_the_adoption_curve():
    from evaluation.gate_power import operating_characteristic_with_cost

    for name in ("pooled", "sequential"):
        plain = operating_characteristic(DESIGNS[name], XCOPA, [0.036], builds=20, seed=5)[0.036]
        point = operating_characteristic_with_cost(DESIGNS[name], XCOPA, [0.036], builds=20, seed=5)[0.036]
        assert (point["rate"], point["se"]) == plain
        assert 0.5 <= point["items"] <= 1 and 0 < point["scorings"] <= point["items"]
        if name == "pooled":
            assert point["items"] == point["scorings"] == 1.0


def test_bench_runs_some_designs_and_merges_them_into_an_earlier_run(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import gate_power

    common = ["--json", "--builds", "4", "--discordance", "0.06", "--figure", str(tmp_path / "oc.png")]
    assert gate_power.main([*common, "--designs", "single,pooled"]) == 0
    earlier = tmp_path / "earlier.json"
    earlier.write_text(capsys.readouterr().out)
    assert gate_power.main([*common, "--designs", "sequential", "--merge", str(earlier)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["designs"]) == ["single", "pooled", "sequential"]
    assert result["designs"]["pooled"] == json.loads(earlier.read_text())["designs"]["pooled"]
    assert set(result["designs"]["sequential"]["items_scored"]) == {"+3.6", "0", "-1", "mixed"}
    assert result["merged_from"]["designs_run_now"] == ["sequential"]
    with pytest.raises(SystemExit, match="same --builds and --seed"):
        gate_power.main([*common[:2], "8", *common[3:], "--designs", "sequential", "--merge", str(earlier)])
    sys.modules.pop("gate_power")


# ---- carry: a proxy set ------------------------------------------------------------------


def test_carry_keeps_a_proxy_gain_only_where_the_target_rules_out_harm():
    rng = np.random.default_rng(0)
    candidates = search_space(LAYERS)
    proxy_plain = rng.random(600) < 0.4
    proxy_steered = proxy_plain | (rng.random(600) < 0.3)  # a large gain on the proxy set
    proxy = Evidence(proxy_plain, {c: proxy_steered for c in candidates})
    target = np.arange(100) % 2 == 0
    fine, harmed = target | (np.arange(100) % 10 == 1), target & (np.arange(100) % 10 != 0)
    decisions = DESIGNS["carry"].decide({
        "sw": Evidence(target, {c: fine for c in candidates}, proxy),
        "tr": Evidence(target, {c: harmed for c in candidates}, proxy)})
    assert decisions["sw"].adopted and "carries" in decisions["sw"].reason and "600 items" in decisions["sw"].reason
    assert not decisions["tr"].adopted and "does not carry" in decisions["tr"].reason


def _build(tiny_model_dir, data_dir, tmp_path, *extra: str) -> list[str]:
    return ["align", "build", "--model", str(tiny_model_dir("llama")), "--source", "sw",
            "--data", f"sib200:dev@{data_dir}", "--max-pairs", "10", "--layers", "0-1",
            "--calibrate", str(data_dir / "xcopa" / "val.sw.jsonl"), "--out", str(tmp_path / "x"), *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gate-design", "carry"], "--gate-design carry chooses the configuration on a larger labelled set of "
                                     "another task: give it with --proxy FILE_OR_DIR"),
        (["--proxy", "XNLI"], "--proxy, --proxy-max-items and --proxy-task are read only by --gate-design carry, "
                              "not current"),
        (["--gate-design", "carry", "--proxy", "XNLI", "--proxy-max-items", "100"],
         "--proxy-max-items 100: a proxy set needs at least 500 items"),
        (["--gate-design", "carry", "--proxy", "XNLI/dev.th.tsv"], "--proxy: no xnli calibration file for swh_Latn"),
        (["--gate-design", "carry", "--proxy", "SMALL"], "design 'carry': swh_Latn needs a labelled set of at least "
                                                         "500 items of another task (XNLI dev has 2,490); got 120"),
        (["--gate-design", "carry", "--proxy", "XCOPA"], "--proxy: the proxy set of swh_Latn is its calibration file"),
    ],
)
def test_carry_in_align_build_refuses_a_missing_or_unusable_proxy(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                   extra, message):
    from lingosteer.entrypoints.main import main

    small = tmp_path / "xnli" / "dev.sw.tsv"  # the task from the folder's name, as the shared data's
    small.parent.mkdir()
    small.write_text("".join((data_dir / "xnli" / "dev.sw.tsv").read_text(encoding="utf-8").splitlines(True)[:120]),
                     encoding="utf-8")
    paths = {"XNLI": str(data_dir / "xnli"), "SMALL": str(small), "XCOPA": str(data_dir / "xcopa" / "val.sw.jsonl")}
    extra = [paths.get(part.split("/")[0], "") + part[len(part.split("/")[0]):] if part.split("/")[0] in paths
             else part for part in extra]
    assert main(_build(tiny_model_dir, data_dir, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_a_carry_build_scores_the_proxy_set_on_the_same_engine(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """The whole `align build --gate-design carry` on a tiny model, with the proxy minimum lowered to keep it short:
    the XNLI proxy items are scored under every candidate through the build's engine and the design decides."""
    from alignment.artifact import load_intervention
    from evaluation import gate_designs
    from lingosteer.entrypoints import align
    from lingosteer.entrypoints.main import main

    monkeypatch.setattr(gate_designs, "MIN_PROXY_ITEMS", 40)
    monkeypatch.setattr(align, "MIN_PROXY_ITEMS", 40)
    out = tmp_path / "swh_Latn"
    assert main(["align", "build", "--model", str(tiny_model_dir("llama")), "--source", "sw",
                 "--data", f"sib200:dev@{data_dir}", "--max-pairs", "24", "--layers", "0-1",
                 "--calibrate", str(data_dir / "xcopa" / "val.sw.jsonl"), "--calibration-max-items", "40",
                 "--gate-design", "carry", "--proxy", str(data_dir / "xnli"), "--proxy-max-items", "60",
                 "--out", str(out)]) == 0
    manifest = load_intervention(out).manifest
    evidence = manifest.evidence
    assert evidence.design == "carry" and evidence.task == "xcopa" and evidence.items == 40
    assert evidence.rule.endswith("Proxy set: dev.sw.tsv (60 items, all candidates scored).")
    assert (manifest.serving.alpha != 0) is evidence.adopted
