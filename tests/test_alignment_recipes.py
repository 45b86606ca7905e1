"""bench/alignment_recipes.py's figures on synthetic states: before any map, after a map, the plot."""

import runpy

import numpy as np
import pytest

from alignment.estimator import LinearAligner
from alignment.evaluate import retrieval_p1
from lingosteer import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recipes():
    return runpy.run_path(str(REPO_ROOT / "bench" / "alignment_recipes.py"))


@pytest.fixture
def states():
    """Every evaluated domain, English = a fixed map near the identity of the source plus noise, 2 layers, dim 8."""
    rng = np.random.default_rng(0)
    mix = np.eye(8) + 0.3 * rng.normal(size=(2, 8, 8))
    sizes = {"sib": 100, "sibtest": 30, "ntrex": 600, "xcopa": 300}
    out = {}
    for name, n in sizes.items():
        src = rng.normal(size=(2, n, 8)).astype(np.float32) + 2.0
        eng = (np.einsum("lij,lnj->lni", mix, src) + 0.5 * rng.normal(size=src.shape)).astype(np.float32)
        out[name] = {"src": {"mean": src}, "eng": {"mean": eng}}
    return out


def test_unmapped_is_retrieval_of_the_states_as_they_are(recipes, states):
    before = recipes["unmapped"](states, "mean")
    assert set(before) == {"sibtest", "ntrex", "xcopa"}
    src, eng = states["ntrex"]["src"]["mean"][1, 300:], states["ntrex"]["eng"]["mean"][1, 300:]
    assert before["ntrex"][1] == {"p1_before": retrieval_p1(src, eng),
                                  "p1_before_centred": retrieval_p1(src - src.mean(0), eng - eng.mean(0))}
    src, eng = states["xcopa"]["src"]["mean"][0], states["xcopa"]["eng"]["mean"][0]
    folds = [retrieval_p1(src[part], eng[part]) for part in (slice(0, 150), slice(150, 300))]
    assert before["xcopa"][0]["p1_before"] == pytest.approx(np.mean(folds))


def test_a_fitted_map_beats_no_map(recipes, states):
    sib = states["sib"]
    aligner = LinearAligner(solver="lstsq").fit(sib["src"]["mean"], sib["eng"]["mean"])
    after, before = recipes["evaluate"](aligner, states, "mean"), recipes["unmapped"](states, "mean")
    for domain, rows in after.items():
        for layer, row in enumerate(rows):
            assert row["p1_after"] > before[domain][layer]["p1_before"] + 0.2


def test_plot_writes_a_png(recipes, tmp_path):
    rows = [{"p1_before": 0.1, "p1_after": 0.5, "p1_before_centred": 0.2, "p1_after_centred": 0.6}] * 3
    results = {name: {"et": {"xcopa": rows}}
               for name in ("ridge|mean|sib", "lstsq|mean|sib", "ridge|mean|sib+ntrex", "ridge|last|sib+ntrex")}
    report = {"results": results, "languages": ["et"], "chosen": {"default": "ridge|last|sib+ntrex"}}
    recipes["plot"](report, tmp_path / "recipes.png")
    assert (tmp_path / "recipes.png").read_bytes()[:8] == PNG_MAGIC


def test_short_fit_takes_distinct_xnli_hypothesis_pairs_and_refuses_unaligned_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # it imports alignment_recipes as the script does
    short_fit = runpy.run_path(str(REPO_ROOT / "bench" / "alignment_short_fit.py"))
    (tmp_path / "xnli").mkdir()
    rows = lambda hyps: "".join(f"premise {i}\t{h}\tneutral\n" for i, h in enumerate(hyps))  # noqa: E731
    (tmp_path / "xnli" / "dev.en.tsv").write_text(rows(["a", "a", "b", "c", "d"]), encoding="utf-8")
    (tmp_path / "xnli" / "dev.sw.tsv").write_text(rows(["A", "A", "B", "C", "D"]), encoding="utf-8")
    assert short_fit["xnli_pairs"]("sw", tmp_path, 3) == (["A", "B", "C"], ["a", "b", "c"])
    (tmp_path / "xnli" / "dev.sw.tsv").write_text(rows(["A", "B"]), encoding="utf-8")
    with pytest.raises(ValueError, match="not line-aligned"):
        short_fit["xnli_pairs"]("sw", tmp_path, 3)


def test_artifacts_are_the_compared_fits_and_load_as_interventions(recipes, tiny_model_dir, data_dir, tmp_path):
    """`artifacts` writes a candidate exactly as `compare` fitted it, servable for the tiny model it names."""
    from alignment.artifact import load_intervention
    from lingosteer.fingerprint import model_fingerprint

    model_dir = tiny_model_dir("llama")  # 2 layers, hidden size 128
    rng = np.random.default_rng(1)
    (tmp_path / "states").mkdir()
    for name in recipes["SETS"]:
        for side in ("src", "eng"):
            n = 600 if name == "ntrex" else 60
            np.savez(tmp_path / "states" / f"sw.{name}.{side}.npz",
                     **{p: rng.normal(size=(2, n, 128)).astype(np.float32) + 1.0 for p in recipes["POOLINGS"]})
    args = recipes["parse_args"](["artifacts", "--model", str(model_dir), "--langs", "sw", "--out", str(tmp_path),
                                  "--data-dir", str(data_dir), "--candidates", "ridge-std|mean|sib+ntrex"])
    recipes["artifacts"](args)
    written = load_intervention(tmp_path / "artifacts" / "ridge-std-mean-sib+ntrex" / "swh_Latn",
                                expected_fingerprint=model_fingerprint(model_dir))
    expected = recipes["fit"](recipes["statistics"](recipes["load_states"](tmp_path / "states", "sw")),
                              "ridge-std", "mean", "sib+ntrex")
    assert written.manifest.standardise is True and written.layers == [0, 1]
    assert [s["spec"] for s in written.fit_data.sources] == ["sib200:train,dev", "ntrex:0-299"]
    x = rng.normal(size=(5, 128)).astype(np.float32)
    for layer in (0, 1):  # the artifact, applied as serving applies it at alpha 1, is the fitted map
        np.testing.assert_allclose(written.apply(x, layer, alpha=1.0), expected.transform(x, layer=layer),
                                   rtol=1e-4, atol=1e-4)
    for bad in ("nope|mean|sib", "ridge-std"):
        args.candidates = ["ridge|mean|sib", bad]  # refused before anything is fitted or written
        with pytest.raises(SystemExit, match="unknown candidate"):
            recipes["artifacts"](args)
        assert not (tmp_path / "artifacts" / "ridge-mean-sib").exists()
