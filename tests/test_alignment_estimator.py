"""LinearAligner on synthetic states with a known answer."""

import numpy as np
import pytest

from alignment.estimator import LinearAligner, SufficientStats


def planted(num_layers=2, n=300, d=24, bias=True, noise=1e-3, seed=0):
    """Source states X and targets Y = W x + b + noise with a known W, b per layer."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_layers, n, d)) + 3.0  # off-centre, like real hidden states
    W = np.eye(d) + rng.normal(size=(num_layers, d, d)) / np.sqrt(d)
    b = rng.normal(size=(num_layers, d)) if bias else np.zeros((num_layers, d))
    Y = np.einsum("lij,lnj->lni", W, X) + b[:, None, :] + noise * rng.normal(size=(num_layers, n, d))
    return X.astype(np.float32), Y.astype(np.float32), W, b


@pytest.mark.parametrize("solver", ["ridge", "lstsq"])
@pytest.mark.parametrize("bias", [False, True])
def test_planted_map_is_recovered(solver, bias):
    X, Y, W, b = planted(bias=bias)
    aligner = LinearAligner(solver=solver, bias=bias).fit(X, Y)
    np.testing.assert_allclose(aligner.W_, W, atol=5e-3)
    np.testing.assert_allclose(aligner.b_, b, atol=2e-2)
    mapped = aligner.transform(X)
    assert np.abs(mapped - Y).max() < 0.05
    # The map explains nearly all of the held-out distance the identity leaves.
    assert (aligner.heldout_error_ratio_ < 1e-3).all()


def test_without_bias_a_planted_offset_is_not_recovered():
    # Guards the bias test above: it passes only because the intercept is really fitted.
    X, Y, _, b = planted(bias=True)
    aligner = LinearAligner(bias=False).fit(X, Y)
    assert np.allclose(aligner.b_, 0)
    assert np.abs(aligner.transform(X) - Y).max() > 0.1


@pytest.mark.parametrize("n", [10, 60])  # underdetermined (INCLINE's usual case) and overdetermined
@pytest.mark.parametrize("bias", [False, True])
def test_lstsq_equals_numpy_lstsq(n, bias):
    rng = np.random.default_rng(1)
    d = 32
    X = rng.normal(size=(n, d)) + 1.0
    Y = rng.normal(size=(n, d))
    aligner = LinearAligner(solver="lstsq", bias=bias, holdout_fraction=0).fit(X, Y)
    if bias:
        mx, my = X.mean(0), Y.mean(0)
        A = np.linalg.lstsq(X - mx, Y - my, rcond=None)[0]
        np.testing.assert_allclose(aligner.b_[0], my - mx @ A, atol=1e-8)
    else:
        A = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(aligner.W_[0], A.T, atol=1e-8)


def test_streaming_equals_one_shot():
    X, Y, _, _ = planted(n=257, bias=True)
    whole = LinearAligner(bias=True).fit(X, Y)
    streamed = LinearAligner(bias=True)
    for start in range(0, 257, 50):
        streamed.partial_fit(X[:, start : start + 50], Y[:, start : start + 50])
    streamed.solve()
    np.testing.assert_allclose(streamed.W_, whole.W_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(streamed.b_, whole.b_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(streamed.lambdas_, whole.lambdas_, rtol=1e-12)


def test_merged_shards_equal_whole():
    X, Y, _, _ = planted(n=300, bias=True, noise=0.5)
    whole = LinearAligner(bias=True, rank=5).fit(X, Y)
    bounds = [0, 77, 190, 300]
    shards = [
        LinearAligner(bias=True, rank=5).partial_fit(X[:, a:b], Y[:, a:b], sample_ids=np.arange(a, b))
        for a, b in zip(bounds, bounds[1:])
    ]
    merged = (shards[0] + shards[1] + shards[2]).solve()
    assert merged.n_samples_ == whole.n_samples_ == 300
    assert merged.heldout_stats_.n == whole.heldout_stats_.n == 60
    np.testing.assert_allclose(merged.lambdas_, whole.lambdas_, rtol=1e-12)
    np.testing.assert_allclose(merged.W_, whole.W_, atol=1e-9)
    np.testing.assert_allclose(merged.b_, whole.b_, atol=1e-9)


def test_merge_refuses_different_routing_and_solves_shared_statistics_any_way():
    with pytest.raises(ValueError, match="different holdout fractions"):
        LinearAligner(holdout_fraction=0.2).merge(LinearAligner(holdout_fraction=0.5))
    X, Y, _, _ = planted(n=120)
    statistics = LinearAligner(solver="ridge").partial_fit(X, Y)
    for solver in ("lstsq", "meanshift", "procrustes"):
        merged = LinearAligner(solver=solver).merge(statistics).solve()
        direct = LinearAligner(solver=solver).fit(X, Y)
        assert merged.solver == solver
        np.testing.assert_allclose(merged.W_, direct.W_, atol=1e-9)
        np.testing.assert_allclose(merged.b_, direct.b_, atol=1e-9)


def test_heldout_error_from_statistics_matches_direct_computation():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(1, 40, 8)), rng.normal(size=(1, 40, 8))
    stats = SufficientStats.zeros(1, 8)
    stats.add(X, Y)
    A, b = rng.normal(size=(8, 8)), rng.normal(size=8)
    direct = np.sum((X[0] @ A + b - Y[0]) ** 2)
    assert stats.squared_error(0, A, b) == pytest.approx(direct, rel=1e-10)


def test_ridge_chooses_stronger_lambda_on_noisier_layer():
    # Layer 0: clean planted map; layer 1: pure noise targets. The held-out choice must
    # shrink the noise layer much harder (toward the identity, i.e. no intervention).
    rng = np.random.default_rng(3)
    X, Y, _, _ = planted(num_layers=2, n=120, d=32, bias=False, noise=1e-3)
    Y[1] = X[1] + 3.0 * rng.normal(size=Y[1].shape)
    aligner = LinearAligner().fit(X, Y)
    assert aligner.lambdas_[1] > 100 * aligner.lambdas_[0]
    assert np.abs(aligner.W_[1] - np.eye(32)).max() < np.abs(aligner.W_[0] - np.eye(32)).max()


def test_low_rank_recovers_planted_low_rank_delta():
    rng = np.random.default_rng(4)
    n, d, r = 400, 32, 3
    X = rng.normal(size=(1, n, d))
    U, V = rng.normal(size=(d, r)), rng.normal(size=(r, d)) / np.sqrt(d)
    Y = X + np.einsum("ij,lnj->lni", U @ V, X) + 1e-3 * rng.normal(size=(1, n, d))
    aligner = LinearAligner(rank=r).fit(X, Y)
    assert aligner.U_.shape == (1, d, r) and aligner.V_.shape == (1, r, d)
    np.testing.assert_allclose(aligner.U_[0] @ aligner.V_[0], U @ V, atol=5e-3)
    np.testing.assert_allclose(aligner.W_[0], np.eye(d) + aligner.U_[0] @ aligner.V_[0], atol=1e-12)
    memory = aligner.parameter_bytes()
    assert memory["per_layer"] == (2 * d * r + d) * 4 and memory["full_total"] == (d * d + d) * 4


def test_memory_of_statistics_does_not_grow_with_pairs():
    X, Y, _, _ = planted(n=300)
    num_layers, _, d = X.shape
    # Training and held-out split each: float64 X^T X, X^T Y [L, d, d], sums of x, y and y^2 [L, d].
    expected = 2 * num_layers * (2 * d * d + 3 * d) * 8
    for n in (30, 300):
        aligner = LinearAligner().partial_fit(X[:, :n], Y[:, :n])
        splits = (aligner.train_stats_, aligner.heldout_stats_)
        assert sum(a.nbytes for s in splits for a in (s.xtx, s.xty, s.sx, s.sy, s.yy)) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="svd"), "solver"),
        (dict(rank=0), "rank"),
        (dict(holdout_fraction=1.0), "holdout_fraction"),
        (dict(lambdas=[0.0]), "positive"),
        (dict(holdout_fraction=0.0), "held-out"),
        (dict(solver="lstsq", standardise=True), "standardise applies to the ridge"),
        (dict(standardise=True, rank=3), "rank"),
        (dict(standardise=True, bias=False), "bias=False"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearAligner(**kwargs)


def test_bad_arrays_are_refused():
    X, Y, _, _ = planted(n=20)
    with pytest.raises(ValueError, match="differ in shape"):
        LinearAligner().partial_fit(X, Y[:, :10])
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LinearAligner().partial_fit(bad, Y)
    with pytest.raises(ValueError, match="not solved"):
        LinearAligner().partial_fit(X, Y).transform(X)
    with pytest.raises(ValueError, match="no training pairs"):
        LinearAligner().solve()


@pytest.mark.parametrize("bias", [False, True])
def test_fast_lambda_path_equals_explicit_solutions(bias):
    # The grid search scores every lambda from one eigendecomposition; check each
    # score against the held-out error of the explicitly solved map.
    X, Y, _, _ = planted(num_layers=1, n=90, d=20, bias=bias, noise=0.5)
    aligner = LinearAligner(bias=bias).partial_fit(X, Y)
    scale = np.trace(aligner.train_stats_.xtx[0]) / 20
    grid = [1e-3 * scale, 0.1 * scale, 10 * scale]
    fast = aligner._ridge_heldout_errors(aligner.train_stats_, aligner.heldout_stats_, grid)
    explicit = [aligner.heldout_stats_.squared_error(0, *aligner._solve_layer(aligner.train_stats_, lam)[:2])
                for lam in grid]
    np.testing.assert_allclose(fast, explicit, rtol=1e-8)
    assert len(set(np.round(explicit, 6))) == 3  # the lambdas really give different maps


def test_merge_with_an_empty_aligner_copies_statistics():
    X, Y, _, _ = planted(n=50)
    filled = LinearAligner().partial_fit(X, Y)
    merged = filled + LinearAligner()
    merged.partial_fit(X, Y)  # must not change `filled`
    assert filled.train_stats_.n + filled.heldout_stats_.n == 50
    assert merged.train_stats_.n + merged.heldout_stats_.n == 100


def test_meanshift_is_the_mean_difference():
    X, Y, _, _ = planted(num_layers=2, n=90, d=16, bias=True)
    aligner = LinearAligner(solver="meanshift").fit(X, Y)
    np.testing.assert_array_equal(aligner.W_, np.broadcast_to(np.eye(16), (2, 16, 16)))
    mean_difference = Y.mean(axis=1, dtype=np.float64) - X.mean(axis=1, dtype=np.float64)
    np.testing.assert_allclose(aligner.b_, mean_difference, atol=1e-9)
    assert aligner.parametrization_ == "shift" and aligner.parameter_bytes()["per_layer"] == 16 * 4


def test_procrustes_recovers_a_planted_rotation_and_is_orthogonal():
    rng = np.random.default_rng(5)
    d = 24
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shift = rng.normal(size=d)
    X = rng.normal(size=(1, 300, d)) + 3.0
    Y = X @ rotation.T + shift + 1e-3 * rng.normal(size=X.shape)
    aligner = LinearAligner(solver="procrustes").fit(X, Y)
    W = aligner.W_[0]
    np.testing.assert_allclose(W @ W.T, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(W, rotation, atol=1e-3)
    np.testing.assert_allclose(aligner.b_[0], shift, atol=1e-2)
    # A map that is not a rotation is still fitted by a rotation: least squares does better.
    scaled = 2.0 * X
    assert LinearAligner(solver="procrustes").fit(X, scaled).heldout_error_ratio_[0] > \
        LinearAligner(solver="lstsq", bias=True).fit(X, scaled).heldout_error_ratio_[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="meanshift", bias=False), "bias=False does not apply"),
        (dict(solver="meanshift", rank=4), "rank applies to the ridge and lstsq"),
        (dict(solver="procrustes", rank=4), "rank applies to the ridge and lstsq"),
    ],
)
def test_options_that_do_not_apply_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearAligner(**kwargs)


def test_default_bias_follows_the_solver():
    solvers = ("ridge", "lstsq", "meanshift", "procrustes")
    assert [LinearAligner(solver=s).bias for s in solvers] == [False, False, True, True]


def massive(num_layers=1, n=400, d=16, seed=5):
    """Planted pairs whose first dimension is ~1000x the others, as in LLM states."""
    X, Y, W, b = planted(num_layers=num_layers, n=n, d=d, bias=True, noise=1e-3, seed=seed)
    scale = np.ones(d)
    scale[0] = 1000.0
    return X * scale, Y * scale, W, b, scale


def test_standardised_statistics_equal_those_of_z_scores():
    X, Y, _, _, _ = massive(n=120)
    stats = SufficientStats.zeros(1, X.shape[2])
    stats.add(X, Y)
    z = stats.moments(0)
    np.testing.assert_allclose(z.mean_x, X[0].mean(0), rtol=1e-9)
    np.testing.assert_allclose(z.std_y, Y[0].std(0), rtol=1e-6)
    direct = SufficientStats.zeros(1, X.shape[2])
    direct.add((X - z.mean_x) / z.std_x, (Y - z.mean_y) / z.std_y)
    derived = stats.standardised(0, z)
    for name in ("xtx", "xty", "sx", "sy", "yy"):
        np.testing.assert_allclose(getattr(derived, name), getattr(direct, name), atol=1e-6, err_msg=name)


def test_standardised_ridge_is_a_ridge_on_z_scores_mapped_back():
    X, Y, _, _, _ = massive(num_layers=2, n=200, d=12)
    X = X + np.random.default_rng(6).normal(size=X.shape)  # a noisy fit: lambda matters
    aligner = LinearAligner(standardise=True, lambdas=[0.3], holdout_fraction=0).fit(X, Y)
    assert aligner.bias and aligner.get_params()["standardise"]
    for layer in range(2):
        mx, sx, my, sy = X[layer].mean(0), X[layer].std(0), Y[layer].mean(0), Y[layer].std(0)
        on_z = LinearAligner(bias=True, lambdas=[0.3], holdout_fraction=0).fit((X[layer] - mx) / sx,
                                                                               (Y[layer] - my) / sy)
        expected = my + sy * on_z.transform((X[layer] - mx) / sx, layer=0)
        np.testing.assert_allclose(aligner.transform(X[layer], layer=layer), expected, rtol=1e-4, atol=1e-3)


def test_standardised_ridge_recovers_a_planted_map_under_massive_activations():
    X, Y, W, b, scale = massive(num_layers=2)
    aligner = LinearAligner(standardise=True).fit(X, Y)
    # In raw coordinates the planted map is diag(scale) W diag(1 / scale), b * scale.
    np.testing.assert_allclose(aligner.W_, scale[:, None] * W / scale[None, :], rtol=1e-2, atol=5e-3)
    np.testing.assert_allclose(aligner.b_, b * scale, rtol=1e-2, atol=0.5)
    assert (aligner.heldout_error_ratio_ < 1e-3).all()
