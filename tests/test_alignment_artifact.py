"""Intervention artifacts: round trips, and every kind of broken artifact refused with its own error."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from alignment import artifact
from alignment.artifact import ServingDefaults as Serving
from alignment.artifact import load_intervention, save_intervention
from alignment.estimator import LinearAligner

D, LAYERS = 16, [1, 3]
FINGERPRINT = {"architecture": "TestForCausalLM", "model_type": "test", "hidden_size": D, "num_hidden_layers": 4,
               "config_sha256": "c" * 64, "tokenizer_sha256": "t" * 64}


def fitted(bias=True, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(len(LAYERS), 200, D))
    Y = X + 0.3 * np.einsum("ij,lnj->lni", rng.normal(size=(D, D)), X) + (rng.normal(size=D) if bias else 0)
    return LinearAligner(bias=bias, rank=rank).fit(X, Y), X


def save(path, aligner=None, **kwargs):
    aligner = aligner or fitted()[0]
    options = dict(fingerprint=FINGERPRINT, source="swh_Latn", target="eng_Latn", layers=LAYERS,
                   pooling="mean", fit_data={"corpus": "synthetic", "num_pairs": 200})
    options.update(kwargs)
    return save_intervention(path, aligner, **options)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_round_trip_full(tmp_path, dtype, tol):
    aligner, X = fitted()
    save(tmp_path / "a", aligner, dtype=dtype, alpha=0.5)
    loaded = load_intervention(tmp_path / "a", expected_fingerprint=FINGERPRINT)
    assert (loaded.source, loaded.target, loaded.layers, loaded.serving.alpha) == ("swh_Latn", "eng_Latn", LAYERS, 0.5)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["dtype"] == dtype and manifest["parametrization"] == "full"
    assert "default_alpha" not in manifest and manifest["serving"]["alpha"] == 0.5  # one stored alpha
    assert manifest["lambdas"] == pytest.approx(list(aligner.lambdas_))
    for i, layer in enumerate(LAYERS):
        D_, b = loaded.delta(layer)
        assert D_.dtype == torch.float32 and b.dtype == torch.float32
        np.testing.assert_allclose(D_.numpy(), aligner.W_[i] - np.eye(D), atol=tol)
        np.testing.assert_allclose(b.numpy(), aligner.b_[i], atol=tol * 4)
        # Serving with alpha = 1 reproduces the fitted map.
        expected = aligner.transform(X[i], layer=i)
        np.testing.assert_allclose(loaded.apply(X[i], layer, alpha=1.0), expected, atol=tol * 40, rtol=tol)


def test_round_trip_lowrank(tmp_path):
    aligner, X = fitted(rank=3)
    save(tmp_path / "a", aligner)
    loaded = load_intervention(tmp_path / "a")
    assert loaded.manifest.parametrization == "lowrank" and loaded.manifest.rank == 3
    assert set(load_file(str(tmp_path / "a" / "matrices.safetensors"))) == {"U.1", "V.1", "b.1", "U.3", "V.3", "b.3"}
    np.testing.assert_allclose(loaded.apply(X[0], 1, alpha=1.0), aligner.transform(X[0], layer=0), atol=1e-4)


def test_round_trip_meanshift_stores_the_bias_alone(tmp_path):
    _, X = fitted()
    aligner = LinearAligner(solver="meanshift").fit(X, X + 2.5)
    save(tmp_path / "a", aligner)
    loaded = load_intervention(tmp_path / "a")
    assert loaded.manifest.parametrization == "shift" and loaded.manifest.solver == "meanshift"
    assert set(load_file(str(tmp_path / "a" / "matrices.safetensors"))) == {"b.1", "b.3"}
    np.testing.assert_allclose(loaded.apply(X[0], 1, alpha=0.5), X[0] + 1.25, atol=1e-5)


def test_incline_form_makes_alpha_incline_strength(tmp_path):
    # INCLINE: h' = h + s * (h @ W_incline) with W_incline the lstsq map (row vectors).
    aligner, X = fitted(bias=False)
    aligner = LinearAligner(solver="lstsq", holdout_fraction=0).fit(X, aligner.transform(X))
    save(tmp_path / "a", aligner, form="incline")
    loaded = load_intervention(tmp_path / "a")
    W_incline = aligner.W_[0].T
    s = -0.7
    np.testing.assert_allclose(loaded.apply(X[0], 1, alpha=s), X[0] + s * X[0] @ W_incline, atol=1e-4)


def test_existing_directory_needs_overwrite_and_stays_valid(tmp_path):
    save(tmp_path / "a")
    with pytest.raises(FileExistsError):
        save(tmp_path / "a")
    save(tmp_path / "a", fitted(seed=1)[0], overwrite=True, alpha=0.25)
    assert load_intervention(tmp_path / "a").serving.alpha == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging leftovers
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "a").iterdir())


# ---- malformed artifacts: each refused with its own error ---------------------------


def _edit_manifest(path, **changes):
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    manifest_path.write_text(json.dumps(manifest))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "matrices.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "matrices.safetensors"))


def _nan(tensors):
    tensors["W.3"][2, 5] = float("nan")


def _inf(tensors):
    tensors["b.1"][0] = float("inf")


CASES = {
    "not a directory": (lambda p: (p / "manifest.json").unlink() or p.rename(p.with_name("gone")),
                        artifact.InterventionNotFoundError),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), artifact.InterventionNotFoundError),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{nope"), artifact.ManifestError),
    "other format": (lambda p: _edit_manifest(p, format="something.else"), artifact.ManifestError),
    "missing field": (lambda p: _edit_manifest(p, pooling=None), artifact.ManifestError),
    "mistyped field": (lambda p: _edit_manifest(p, layers="1,3"), artifact.ManifestError),
    "layer beyond model": (lambda p: _edit_manifest(p, layers=[1, 9]), artifact.ManifestError),
    "format version": (lambda p: _edit_manifest(p, format_version=4), artifact.FormatVersionError),
    "serving layers not in artifact": (lambda p: _edit_manifest(p, serving={"alpha": 0.5, "layers": [0],
                                                                            "positions": "last"}),
                                       artifact.ManifestError),
    "serving positions": (lambda p: _edit_manifest(p, serving={"alpha": 0.5, "layers": [1], "positions": "first"}),
                          artifact.ManifestError),
    "parametrization": (lambda p: _edit_manifest(p, parametrization="kronecker"), artifact.ParametrizationError),
    "form": (lambda p: _edit_manifest(p, form="replace"), artifact.ParametrizationError),
    "hidden size vs model": (lambda p: _edit_manifest(p, hidden_size=32), artifact.ShapeMismatchError),
    "pickle instead": (lambda p: (p / "matrices.safetensors").write_bytes(pickle.dumps({"W.1": [1.0]})),
                       artifact.NotSafetensorsError),
    "torch.save instead": (lambda p: torch.save({"W.1": torch.eye(D)}, p / "matrices.safetensors"),
                           artifact.NotSafetensorsError),
    "garbage bytes": (lambda p: (p / "matrices.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at all"),
                      artifact.NotSafetensorsError),
    "truncated": (lambda p: (p / "matrices.safetensors").write_bytes((p / "matrices.safetensors").read_bytes()[:-100]),
                  artifact.NotSafetensorsError),
    "only a .bin": (lambda p: (p / "matrices.safetensors").rename(p / "matrices.bin"), artifact.NotSafetensorsError),
    "missing layer tensor": (lambda p: _edit_tensors(p, lambda t: t.pop("W.3")), artifact.MissingTensorError),
    "extra tensor": (lambda p: _edit_tensors(p, lambda t: t.update({"W.2": torch.eye(D)})),
                     artifact.UnexpectedTensorError),
    "wrong dtype": (lambda p: _edit_tensors(p, lambda t: t.update({"b.1": t["b.1"].double()})),
                    artifact.TensorDtypeError),
    "wrong shape": (lambda p: _edit_tensors(p, lambda t: t.update({"W.1": torch.eye(D + 1)})),
                    artifact.ShapeMismatchError),
    "nan": (lambda p: _edit_tensors(p, _nan), artifact.NonFiniteError),
    "inf": (lambda p: _edit_tensors(p, _inf), artifact.NonFiniteError),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_artifact_is_refused_with_its_own_error(tmp_path, case):
    breaker, error = CASES[case]
    path = save(tmp_path / "a")
    load_intervention(path)  # valid before the damage
    breaker(path)
    with pytest.raises(error) as info:
        load_intervention(path)
    assert type(info.value) is error  # its own class, not a sibling or the base
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_wrong_model_is_refused(tmp_path):
    path = save(tmp_path / "a")
    other = {**FINGERPRINT, "config_sha256": "d" * 64}
    with pytest.raises(artifact.FingerprintMismatchError, match="config_sha256"):
        load_intervention(path, expected_fingerprint=other)


def test_file_over_size_limit_is_refused(tmp_path):
    path = save(tmp_path / "a")
    size = (path / "matrices.safetensors").stat().st_size
    load_intervention(path, max_bytes=size)
    with pytest.raises(artifact.NotSafetensorsError, match="over the limit"):
        load_intervention(path, max_bytes=size - 1)


def test_serving_defaults_are_recorded_with_their_evidence_and_version_1_still_loads(tmp_path):
    save(tmp_path / "a", alpha=0.5)
    loaded = load_intervention(tmp_path / "a")
    assert loaded.serving == Serving(alpha=0.5, layers=LAYERS, positions="last") and loaded.evidence is None
    evidence = artifact.Evidence(
        task="xcopa", file="val.sw.jsonl", items=100, plain_accuracy=0.55, cross_validated_accuracy=0.6, delta=0.05,
        delta_ci95=[0.01, 0.09], adopted=True, fold_choices=[], candidate_accuracy={}, rule="...", date="today",
        engine={}, summary="...", minimum_detectable_gain=0.04)  # a field this code does not name is kept
    artifact.set_serving_defaults(tmp_path / "a", Serving(alpha=-0.5, layers=[3], positions="prompt"), evidence)
    loaded = load_intervention(tmp_path / "a")
    assert loaded.serving == Serving(alpha=-0.5, layers=[3], positions="prompt") and loaded.evidence == evidence
    with pytest.raises(artifact.ManifestError, match="not a non-empty subset"):
        artifact.set_serving_defaults(tmp_path / "a", Serving(alpha=1.0, layers=[2], positions="last"), evidence)
    assert load_intervention(tmp_path / "a").serving.layers == (3,)  # the refused update changed nothing
    # A version-2 manifest stored the alpha twice; the serving alpha is the one read.
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2, "default_alpha": -0.5}))
    assert load_intervention(tmp_path / "a").serving == Serving(alpha=-0.5, layers=[3], positions="prompt")
    # A version-1 manifest (no serving, no evidence) serves what version 1 served.
    for key in ("serving", "evidence"):
        del manifest[key]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "default_alpha": -0.5}))
    old = load_intervention(tmp_path / "a")
    assert old.serving == Serving(alpha=-0.5, layers=LAYERS, positions="last") and old.evidence is None
    # Rewriting its serving defaults writes the current version, with one alpha.
    artifact.set_serving_defaults(tmp_path / "a", Serving(alpha=0.25, layers=[3], positions="last"), evidence)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and "default_alpha" not in manifest and manifest["serving"]["alpha"] == 0.25


def test_the_version_is_the_content_hash_of_the_files(tmp_path):
    first, same, other = save(tmp_path / "a"), save(tmp_path / "b"), save(tmp_path / "c", alpha=0.5)
    # `created` is in the manifest: copy it so that only the alpha differs
    (same / "manifest.json").write_bytes((first / "manifest.json").read_bytes())
    assert artifact.artifact_version(first) == artifact.artifact_version(same) != artifact.artifact_version(other)


def test_discovery_finds_artifacts_at_any_depth_and_skips_hidden_directories(tmp_path):
    root = tmp_path / "root"
    swahili = save(root / "model" / "swh")
    italian = save(root / "ita", source="ita_Latn")
    # A writer's staging area holds a complete-looking manifest before its rename; an upload area
    # may hold anything. Neither is read.
    save(root / "model" / ".fra_Latn.build.xyz", source="fra_Latn")
    (root / ".uploads" / "abc").mkdir(parents=True)
    (root / ".uploads" / "abc" / "manifest.json").write_text("{}")
    (root / "linked").symlink_to(root / "model", target_is_directory=True)  # not followed: no duplicate

    assert artifact.find_artifact_dirs(root) == [italian, swahili]
    assert artifact.discover_interventions(root) == {"ita_Latn": italian, "swh_Latn": swahili}
    assert artifact.discover_interventions(swahili) == {"swh_Latn": swahili}  # an artifact is its own root
    assert artifact.discover_interventions(root, ["swh_Latn"]) == {"swh_Latn": swahili}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        artifact.discover_interventions(tmp_path / "missing")


def test_discovery_keeps_this_models_artifacts_one_per_language(tmp_path):
    root = tmp_path / "root"
    swahili = save(root / "test" / "swh")
    save(root / "other" / "fra", source="fra_Latn", fingerprint={**FINGERPRINT, "tokenizer_sha256": "u" * 64})

    assert artifact.discover_interventions(root, fingerprint=FINGERPRINT) == {"swh_Latn": swahili}
    with pytest.raises(FileNotFoundError, match="no intervention for fra_Latn .*1 fitted on another model skipped"):
        artifact.discover_interventions(root, ["fra_Latn"], FINGERPRINT)
    # Only the fingerprint's fields count: a manifest may record more about its model.
    save(root / "test" / "swh", fingerprint={**FINGERPRINT, "note": "extra"}, overwrite=True)
    assert artifact.discover_interventions(root, fingerprint=FINGERPRINT) == {"swh_Latn": swahili}
    save(root / "again" / "swh")
    with pytest.raises(artifact.InterventionError, match="two interventions for swh_Latn"):
        artifact.discover_interventions(root)


def test_discovery_within_root_skips_files_linking_outside(tmp_path):
    root, outside = tmp_path / "root", save(tmp_path / "outside")
    (root / "sneaky").mkdir(parents=True)
    for name in artifact.ARTIFACT_FILES:
        (root / "sneaky" / name).symlink_to(outside / name)

    assert artifact.files_outside(root / "sneaky", root) == list(artifact.ARTIFACT_FILES)
    assert artifact.discover_interventions(root) == {"swh_Latn": root / "sneaky"}
    assert artifact.discover_interventions(root, within_root=True) == {}
