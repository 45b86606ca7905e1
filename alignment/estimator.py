"""`LinearAligner`: per-layer linear maps from source-language to target-language states.

Arrays in, fitted state out, no I/O (scikit-learn style). For every layer we
fit a map in column-vector form, y ~ W x + b, which is what serving applies:

    h' = h + alpha * (W h + b - h)

INCLINE's own form, h' = h + s * (h W_incline) with row vectors, is the special
case W = I + W_incline^T (see `alignment.artifact`, which records the form).

Streaming: `partial_fit` only adds sufficient statistics per layer,

    X^T X, X^T Y, sum x, sum y, sum y^2 (per dimension), n          (float64)

so memory is O(L d^2) whatever the number of sentences, and the statistics of
several shards add up (`merge` or `+`) to exactly those of the whole. `solve()`
turns the statistics into maps. Every k-th sentence (k = round(1 / holdout_fraction),
routed by its global sample id) goes to separate held-out statistics; ridge picks
its lambda per layer on them, then refits on all sentences with that lambda.
The held-out squared error of any (W, b) is exact from the statistics:

    sum ||W x + b - y||^2 = tr(YtY) - 2 tr(A^T XtY) + tr(A^T XtX A)
                            + 2 b.(A^T sx) - 2 b.sy + n ||b||^2,   A = W^T.

Solvers (row form A = W^T, so that X A ~ Y):
- "ridge" (default): min ||Y - X A - 1 b^T||^2 + lam ||A - I||^2. The penalty
  pulls W toward the identity, i.e. toward "no intervention", so a layer with too
  little evidence is left alone rather than squashed toward zero. Lambdas are
  given relative to the mean eigenvalue of X^T X (scale-free); the absolute
  values chosen are reported in `lambdas_`.
- "lstsq": exactly INCLINE, min-norm least squares pinv(X) Y, computed as
  pinv(X^T X) X^T Y (identical: pinv(X) = pinv(X^T X) X^T). Eigenvalues below
  `rcond * max eigenvalue` count as zero.
- "meanshift" (DiffMean): W = I, b = mean(y) - mean(x). d parameters per layer,
  nothing to overfit; the method language-steering comparisons find most robust.
- "procrustes": the orthogonal W that best rotates centred source states onto
  centred target states (W = U V^T from the SVD of the centred X^T Y), plus the
  mean shift b = mean(y) - W mean(x). Norm-preserving, d(d-1)/2 degrees of freedom.
- `bias=True` fits an intercept (centred statistics; the intercept is not penalised).
  The default (None) is each solver's own: without for ridge and lstsq, with for
  meanshift (which is nothing but a bias) and procrustes.
- `standardise=True` (ridge only) fits the ridge on per-dimension z-scores of both
  sides, z = (h - mean) / std, and converts the map back to W h + b. LLM states
  carry a few "massive activation" dimensions (Gemma 3 270M, layer 9: one dimension
  near 6,000 in every sentence's pooled state, against ~1 elsewhere) that dominate a squared error in raw
  coordinates, so a raw ridge spends its fit on them; on z-scores every dimension
  counts alike. The identity the penalty pulls toward is then "match each
  dimension's mean and spread" (W = diag(std_y / std_x)), the map's intercept is
  fitted, and lambda is chosen on held-out error in z-scores (with the training
  part's moments). Needs the bias; cannot be truncated to a rank (W - I would not
  be low-rank).
- `rank=r` constrains the delta W - I to rank r (reduced-rank ridge: the ridge
  solution projected on the top-r directions of its fitted values), stored as
  factors U (d x r), V (r x d) with W = I + U V. Lambda is chosen for the
  full-rank map (one eigendecomposition serves the whole grid), then truncated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

SOLVERS = ("ridge", "lstsq", "meanshift", "procrustes")
BIASED_SOLVERS = ("meanshift", "procrustes")  # bias on unless told otherwise
RANK_SOLVERS = ("ridge", "lstsq")  # the solvers whose delta W - I can be truncated
DEFAULT_LAMBDAS = tuple(np.logspace(-5, 2, 15))
LSTSQ_RCOND = 1e-12


@dataclass
class SufficientStats:
    """Per-layer sums over sentences; `a + b` is the statistics of both sets of sentences."""

    xtx: np.ndarray  # [L, d, d]
    xty: np.ndarray  # [L, d, d]
    sx: np.ndarray  # [L, d]
    sy: np.ndarray  # [L, d]
    yy: np.ndarray  # [L, d]  sum of y^2 per dimension
    n: int

    @classmethod
    def zeros(cls, num_layers: int, dim: int) -> "SufficientStats":
        return cls(
            xtx=np.zeros((num_layers, dim, dim)),
            xty=np.zeros((num_layers, dim, dim)),
            sx=np.zeros((num_layers, dim)),
            sy=np.zeros((num_layers, dim)),
            yy=np.zeros((num_layers, dim)),
            n=0,
        )

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate rows x, y: [L, m, d] (promoted to float64 before products)."""
        if x.shape[1] == 0:
            return
        x = x.astype(np.float64)
        y = y.astype(np.float64)
        self.xtx += x.transpose(0, 2, 1) @ x
        self.xty += x.transpose(0, 2, 1) @ y
        self.sx += x.sum(axis=1)
        self.sy += y.sum(axis=1)
        self.yy += np.einsum("lmi,lmi->li", y, y)
        self.n += x.shape[1]

    def layer(self, index: int) -> "SufficientStats":
        """The statistics of one layer as a one-layer view (no copy)."""
        i = slice(index, index + 1)
        return SufficientStats(self.xtx[i], self.xty[i], self.sx[i], self.sy[i], self.yy[i], self.n)

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(
            self.xtx + other.xtx, self.xty + other.xty, self.sx + other.sx,
            self.sy + other.sy, self.yy + other.yy, self.n + other.n,
        )

    def squared_error(self, layer: int, a: np.ndarray, b: np.ndarray) -> float:
        """sum over these sentences of ||x A + b - y||^2 for one layer (row form)."""
        xtx, xty, sx, sy = self.xtx[layer], self.xty[layer], self.sx[layer], self.sy[layer]
        value = (
            self.yy[layer].sum()
            - 2.0 * np.sum(a * xty)
            + np.sum(a * (xtx @ a))
            + 2.0 * b @ (a.T @ sx)
            - 2.0 * b @ sy
            + self.n * (b @ b)
        )
        return float(value)

    def centred(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(XtX, XtY) about the means, and the means (mean_x, mean_y)."""
        mx, my = self.sx[layer] / self.n, self.sy[layer] / self.n
        xtx = self.xtx[layer] - self.n * np.outer(mx, mx)
        xty = self.xty[layer] - self.n * np.outer(mx, my)
        return xtx, xty, mx, my

    def moments(self, layer: int) -> "Standardisation":
        """Per-dimension means and standard deviations of x and y (a constant dimension gets std 1)."""
        mx, my = self.sx[layer] / self.n, self.sy[layer] / self.n
        var_x = np.diag(self.xtx[layer]) / self.n - mx**2
        var_y = self.yy[layer] / self.n - my**2
        std = lambda var: np.where(var > 0, np.sqrt(np.maximum(var, 0.0)), 1.0)  # noqa: E731
        return Standardisation(mx, std(var_x), my, std(var_y))

    def standardised(self, layer: int, z: "Standardisation") -> "SufficientStats":
        """One-layer statistics of the z-scores (x - z.mean_x) / z.std_x and (y - z.mean_y) / z.std_y."""
        n, sx, sy = self.n, self.sx[layer], self.sy[layer]
        xtx = self.xtx[layer] - np.outer(sx, z.mean_x) - np.outer(z.mean_x, sx) + n * np.outer(z.mean_x, z.mean_x)
        xty = self.xty[layer] - np.outer(sx, z.mean_y) - np.outer(z.mean_x, sy) + n * np.outer(z.mean_x, z.mean_y)
        yy = self.yy[layer] - 2.0 * z.mean_y * sy + n * z.mean_y**2
        return SufficientStats(
            xtx=(xtx / np.outer(z.std_x, z.std_x))[None],
            xty=(xty / np.outer(z.std_x, z.std_y))[None],
            sx=((sx - n * z.mean_x) / z.std_x)[None],
            sy=((sy - n * z.mean_y) / z.std_y)[None],
            yy=(yy / z.std_y**2)[None],
            n=n,
        )


@dataclass(frozen=True)
class Standardisation:
    """Per-dimension moments that turn states into z-scores, and z-score maps back into raw ones."""

    mean_x: np.ndarray
    std_x: np.ndarray
    mean_y: np.ndarray
    std_y: np.ndarray

    def to_raw(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row form: (y - my) / sy = ((x - mx) / sx) a + b  <=>  y = x A + B."""
        raw_a = a * (self.std_y[None, :] / self.std_x[:, None])
        return raw_a, self.mean_y - self.mean_x @ raw_a + b * self.std_y


class LinearAligner:
    """Per-layer linear maps x -> W x + b fitted on paired states [n_layers, n, d]."""

    def __init__(
        self,
        solver: str = "ridge",
        bias: bool | None = None,
        rank: int | None = None,
        lambdas=DEFAULT_LAMBDAS,
        holdout_fraction: float = 0.2,
        standardise: bool = False,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if rank is not None and solver not in RANK_SOLVERS:
            raise ValueError(f"rank applies to the {' and '.join(RANK_SOLVERS)} solvers, not {solver}")
        if solver == "meanshift" and bias is False:
            raise ValueError("meanshift is a bias alone (W = I, b = mean(target) - mean(source)); "
                             "bias=False does not apply")
        if standardise and solver != "ridge":
            raise ValueError(f"standardise applies to the ridge solver, not {solver}")
        if standardise and rank is not None:
            raise ValueError("standardise cannot be combined with rank (W - I of a standardised map is not low-rank)")
        if standardise and bias is False:
            raise ValueError("standardise fits the intercept (z-scores are centred); bias=False does not apply")
        bias = solver in BIASED_SOLVERS or standardise if bias is None else bool(bias)
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        lambdas = tuple(float(lam) for lam in np.atleast_1d(lambdas))
        if solver == "ridge" and (not lambdas or min(lambdas) <= 0):
            raise ValueError("ridge needs positive lambdas")
        if solver == "ridge" and len(lambdas) > 1 and holdout_fraction == 0:
            raise ValueError("choosing among several lambdas needs held-out data (holdout_fraction > 0)")
        self.solver = solver
        self.bias = bias
        self.rank = rank
        self.lambdas = lambdas
        self.holdout_fraction = holdout_fraction
        self.standardise = bool(standardise)
        self.reset()

    # ---- statistics -------------------------------------------------------------

    def reset(self) -> "LinearAligner":
        self.train_stats_: SufficientStats | None = None
        self.heldout_stats_: SufficientStats | None = None
        self.samples_seen_ = 0
        self._solved = False
        return self

    @property
    def holdout_every(self) -> int:
        return 0 if self.holdout_fraction == 0 else max(2, round(1.0 / self.holdout_fraction))

    def partial_fit(self, X_src, X_tgt, sample_ids=None) -> "LinearAligner":
        """Add pairs to the statistics. Arrays [n_layers, n, d] (or [n, d] for one layer).

        `sample_ids` are the pairs' global indices (default: a running count); a pair
        goes to the held-out statistics when id % k == k - 1. Shards of one corpus
        that pass their global ids merge to exactly the fit of the whole corpus.
        """
        x, y = _as_layers(X_src), _as_layers(X_tgt)
        if x.shape != y.shape:
            raise ValueError(f"source and target states differ in shape: {x.shape} vs {y.shape}")
        n = x.shape[1]
        ids = np.arange(self.samples_seen_, self.samples_seen_ + n) if sample_ids is None else np.asarray(sample_ids)
        if ids.shape != (n,):
            raise ValueError(f"sample_ids must have one id per pair ({n}), got shape {ids.shape}")
        if self.train_stats_ is None:
            self.train_stats_ = SufficientStats.zeros(x.shape[0], x.shape[2])
            self.heldout_stats_ = SufficientStats.zeros(x.shape[0], x.shape[2])
        elif self.train_stats_.xtx.shape[:2] != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"states of shape {x.shape} do not match earlier ones "
                f"({self.train_stats_.xtx.shape[0]} layers, dim {self.train_stats_.xtx.shape[1]})"
            )
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("hidden states contain NaN or infinite values")
        k = self.holdout_every
        held = (ids % k == k - 1) if k else np.zeros(n, dtype=bool)
        self.train_stats_.add(x[:, ~held], y[:, ~held])
        self.heldout_stats_.add(x[:, held], y[:, held])
        self.samples_seen_ += n
        self._solved = False
        return self

    def merge(self, other: "LinearAligner") -> "LinearAligner":
        """A new, unsolved aligner with this one's settings and the statistics of both.

        The statistics do not depend on the solver, so one set of statistics can be
        solved several ways; only the held-out routing (`holdout_fraction`) must agree.
        """
        if self.holdout_fraction != other.holdout_fraction:
            raise ValueError(f"cannot merge statistics routed with different holdout fractions: "
                             f"{self.holdout_fraction} vs {other.holdout_fraction}")
        merged = LinearAligner(**self.get_params())
        if self.train_stats_ is None or other.train_stats_ is None:
            source = self if other.train_stats_ is None else other
            merged.train_stats_ = copy.deepcopy(source.train_stats_)  # no aliasing: both stay independent
            merged.heldout_stats_ = copy.deepcopy(source.heldout_stats_)
        else:
            merged.train_stats_ = self.train_stats_ + other.train_stats_
            merged.heldout_stats_ = self.heldout_stats_ + other.heldout_stats_
        merged.samples_seen_ = self.samples_seen_ + other.samples_seen_
        return merged

    __add__ = merge

    def get_params(self) -> dict:
        return dict(solver=self.solver, bias=self.bias, rank=self.rank, lambdas=self.lambdas,
                    holdout_fraction=self.holdout_fraction, standardise=self.standardise)

    # ---- solving ----------------------------------------------------------------

    def fit(self, X_src, X_tgt) -> "LinearAligner":
        return self.reset().partial_fit(X_src, X_tgt).solve()

    def solve(self) -> "LinearAligner":
        """Choose lambda per layer on the held-out statistics, then refit on everything."""
        if self.train_stats_ is None or self.train_stats_.n == 0:
            raise ValueError("no training pairs: call partial_fit first")
        num_layers, dim = self.train_stats_.sx.shape
        r = dim if self.rank is None else min(self.rank, dim)
        A = np.empty((num_layers, dim, dim))
        b = np.zeros((num_layers, dim))
        self.U_ = np.empty((num_layers, dim, r)) if self.rank is not None else None
        self.V_ = np.empty((num_layers, r, dim)) if self.rank is not None else None
        self.lambdas_ = np.full(num_layers, np.nan)
        self.heldout_error_ratio_ = np.full(num_layers, np.nan)
        for layer in range(num_layers):
            train, held = self.train_stats_.layer(layer), self.heldout_stats_.layer(layer)
            self.lambdas_[layer], self.heldout_error_ratio_[layer] = self._choose_lambda(train, held)
            # All pairs, one layer at a time: summing every layer at once would add another O(L d^2).
            A[layer], b[layer], factors = self._solve_layer(train + held, self.lambdas_[layer])
            if factors is not None:
                self.U_[layer], self.V_[layer] = factors
        self.W_ = np.ascontiguousarray(A.transpose(0, 2, 1))
        self.b_ = b
        self.n_samples_ = self.train_stats_.n + self.heldout_stats_.n
        self._solved = True
        return self

    def _choose_lambda(self, train: SufficientStats, held: SufficientStats) -> tuple[float, float]:
        """(lambda, held-out error ratio) for one layer's statistics.

        The ratio is the held-out squared distance left by the map fitted on the
        training part, over that left by the identity (no intervention), both in raw
        coordinates: below 1 means the map generalises. NaN without held-out pairs.
        lstsq has no lambda (NaN). With a rank limit, lambda is chosen for the
        full-rank map, then truncated. A standardised ridge scores the grid in z-scores
        (the objective it minimises), with the training part's moments.
        """
        fitted_train, fitted_held = train, held
        if self.standardise:
            z = train.moments(0)
            fitted_train, fitted_held = train.standardised(0, z), held.standardised(0, z)
        if self.solver != "ridge":
            grid = [np.nan]
        else:
            scale = np.trace(fitted_train.xtx[0]) / fitted_train.xtx.shape[1]
            grid = [lam * scale for lam in self.lambdas]
        if held.n == 0:
            if len(grid) > 1:
                raise ValueError("need held-out pairs to choose lambda (fit more pairs or give a single lambda)")
            return grid[0], np.nan
        if train.n == 0:
            raise ValueError(f"all {held.n} pairs went to the held-out part: fit more pairs")
        best = int(np.argmin(self._ridge_heldout_errors(fitted_train, fitted_held, grid))) if len(grid) > 1 else 0
        dim = train.sx.shape[1]
        identity = held.squared_error(0, np.eye(dim), np.zeros(dim))
        chosen = held.squared_error(0, *self._solve_layer(train, grid[best])[:2])
        return grid[best], chosen / identity

    def _ridge_heldout_errors(self, train: SufficientStats, held: SufficientStats, grid: list[float]) -> np.ndarray:
        """Held-out squared error of the training-part ridge map for every lambda in `grid` (one layer).

        One eigendecomposition XtX = Q diag(e) Q^T serves the whole grid: with
        M = Q^T (XtY - XtX) and s = 1 / (e + lam), the delta is Q diag(s) M and every
        term of the held-out error is a cheap function of s (O(d^2) per lambda).
        """
        dim = train.sx.shape[1]
        if self.bias:
            xtx, xty, mx, my = train.centred(0)
        else:
            xtx, xty, mx, my = train.xtx[0], train.xty[0], np.zeros(dim), np.zeros(dim)
        e, Q = np.linalg.eigh(xtx)
        M = Q.T @ (xty - xtx)
        H, C = held.xtx[0], held.xty[0]
        HQ = H @ Q
        cross_c = np.sum((Q.T @ C) * M, axis=1)  # tr(delta^T C) = s . cross_c
        cross_h = np.sum(HQ.T * M, axis=1)  # tr(delta^T H) = s . cross_h
        quad = (Q.T @ HQ) * (M @ M.T)  # tr(delta^T H delta) = s^T quad s
        base = held.yy[0].sum() - 2.0 * np.trace(C) + np.trace(H)  # error of A = I, b = 0
        mx_q, sx_q = mx @ Q, Q.T @ held.sx[0]
        errors = []
        for lam in grid:
            s = 1.0 / (e + lam)
            error = base - 2.0 * s @ cross_c + 2.0 * s @ cross_h + s @ quad @ s
            if self.bias:
                b = my - mx - (mx_q * s) @ M  # my - mx A
                at_sx = held.sx[0] + M.T @ (s * sx_q)  # A^T sx
                error += 2.0 * b @ at_sx - 2.0 * b @ held.sy[0] + held.n * (b @ b)
            errors.append(error)
        return np.array(errors)

    def _solve_layer(self, stats: SufficientStats, lam: float):
        """Row-form (A, b, low-rank factors or None) minimising the objective on one layer's `stats`."""
        if self.standardise:
            z = stats.moments(0)
            a, b, _ = self._solve_raw(stats.standardised(0, z), lam)
            return (*z.to_raw(a, b), None)
        return self._solve_raw(stats, lam)

    def _solve_raw(self, stats: SufficientStats, lam: float):
        """`_solve_layer` in the coordinates `stats` were accumulated in."""
        dim = stats.sx.shape[1]
        if self.bias:
            xtx, xty, mx, my = stats.centred(0)
        else:
            xtx, xty, mx, my = stats.xtx[0], stats.xty[0], np.zeros(dim), np.zeros(dim)
        if self.solver == "meanshift":
            return np.eye(dim), my - mx, None
        if self.solver == "procrustes":
            u, _, vt = np.linalg.svd(xty)
            a = u @ vt  # row form: X A ~ Y with A orthogonal
            return a, (my - mx @ a if self.bias else np.zeros(dim)), None
        if self.solver == "lstsq":
            eigvals, Q = np.linalg.eigh(xtx)
            keep = eigvals > LSTSQ_RCOND * max(eigvals.max(), 0.0)
            inv = np.where(keep, 1.0 / np.where(keep, eigvals, 1.0), 0.0)
            delta = Q @ (inv[:, None] * (Q.T @ xty)) - np.eye(dim)
            fit_cov = xtx
        else:
            # A = I + (XtX + lam I)^-1 (XtY - XtX); XtX + lam I is positive definite.
            fit_cov = xtx + lam * np.eye(dim)
            delta = np.linalg.solve(fit_cov, xty - xtx)
        factors = None
        if self.rank is not None:
            # Reduced-rank: keep the top-r directions of the fitted deltas X @ delta.
            _, vecs = np.linalg.eigh(delta.T @ fit_cov @ delta)
            top = vecs[:, ::-1][:, : min(self.rank, dim)]
            left = delta @ top  # row form delta ~ left @ top.T
            delta = left @ top.T
            factors = (top, left.T)  # column form: W - I = delta.T = top @ left.T = U V
        a = np.eye(dim) + delta
        b = my - mx @ a if self.bias else np.zeros(dim)
        return a, b, factors

    # ---- using the fit ----------------------------------------------------------

    def _check_solved(self) -> None:
        if not self._solved:
            raise ValueError("this LinearAligner is not solved yet: call fit() or solve()")

    def transform(self, X, layer: int | None = None) -> np.ndarray:
        """Map source states: X [n_layers, n, d] (all layers) or X [n, d] with its layer position."""
        self._check_solved()
        X = np.asarray(X)
        if layer is None:
            x = _as_layers(X)
            if x.shape[0] != self.W_.shape[0]:
                raise ValueError(f"expected {self.W_.shape[0]} layers, got {x.shape[0]}; pass layer= for one")
            return (np.einsum("lij,lnj->lni", self.W_, x) + self.b_[:, None, :]).astype(np.float32)
        if X.ndim != 2:
            raise ValueError(f"with layer= pass states [n, d], got shape {X.shape}")
        return (X @ self.W_[layer].T + self.b_[layer]).astype(np.float32)

    @property
    def parametrization_(self) -> str:
        """How the map is stored: "shift" (b only, W = I), "lowrank" (W = I + U V) or "full"."""
        self._check_solved()
        if self.solver == "meanshift":
            return "shift"
        return "full" if self.U_ is None else "lowrank"

    def parameter_bytes(self, bytes_per_value: int = 4) -> dict:
        """Memory of the stored map per layer (tensors only): W or its factors, and b."""
        self._check_solved()
        dim = self.W_.shape[1]
        matrix_values = {"shift": 0, "full": dim * dim,
                         "lowrank": 2 * dim * (0 if self.U_ is None else self.U_.shape[2])}
        stored = (matrix_values[self.parametrization_] + dim) * bytes_per_value
        full = (dim * dim + dim) * bytes_per_value
        layers = self.W_.shape[0]
        return {"per_layer": stored, "total": stored * layers, "full_total": full * layers}


def _as_layers(X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim == 2:
        X = X[None]
    if X.ndim != 3:
        raise ValueError(f"states must be [n_layers, n, d] or [n, d], got shape {X.shape}")
    return X
