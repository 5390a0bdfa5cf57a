"""Batched L2-regularised logistic regression: a whole probe grid (C x fold x draw) in one torch solve.

Each problem minimises scikit-learn's binary ``LogisticRegression`` objective (``l1_ratio=0``)::

    C * sum_i w_i * logloss(y_i, x_i @ coef + intercept) + 0.5 * ||coef||^2

with an unpenalised intercept, one logit, and ``w_i`` the class weights (``"balanced"``: ``n / (2 n_c)``,
counted on that problem's own training rows). Features are standardised per problem on its training rows first
(`Standardizer`, scikit-learn's ``StandardScaler`` rule); the returned coefficients are folded back to raw
feature units, so scoring new rows needs no scaler.

Why it is fast: at the optimum ``coef = C * X^T (w * (y - p))`` lies in the row span of X (representer
theorem), so a problem with n training rows and D features has min(n, D) + 1 unknowns. Few-shot problems are
solved in kernel form (``coef = X^T a``, Newton on the n x n kernel: a 16-image support set with 2,048
features has 17 unknowns, not 2,049); full-data problems with n >> D in primal form. Each Newton step is one
batched Cholesky solve with the intercept treated exactly; Armijo backtracking keeps it safe, and the L2 term
makes the objective strictly convex, so separable data -- the rule in few-shot -- is fine. The C grid is
walked upwards with warm starts, so a whole grid costs a few steps per C. Work is float64: results match
scikit-learn's lbfgs run to a tight tolerance.

Threads: on CPU, batched Cholesky and triangular solves call LAPACK once per matrix, and each call (like each
small element-wise or batched-matmul op) opens an OpenMP parallel region. For small systems the regions cost more
than they share, and on a shared machine every region waits for its slowest thread: one descheduled thread stalls
it for a scheduler time slice. A few-shot grid at load 8 on 2 cores ran 4-5x slower with 2 threads than with 1
(`benchmarks/bench_probe.py`). So systems of up to `SINGLE_THREAD_MAX` unknowns are solved with one intra-op
thread; larger ones (full-data primal problems) keep torch's thread count, where each region has real work.
Scoring products of up to `SINGLE_THREAD_WORK` multiply-adds run on one thread for the same reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor

DTYPE = torch.float64
ARMIJO = 1e-4
N_BACKTRACK = 30  # step sizes 1, 1/2, ..., 2**-29 tried at once
MAX_ELEMENTS = 2**24  # bounds a chunk's float64 work arrays to ~128 MB each
CURVATURE_FLOOR = 1e-200  # per-sample curvature below this is dropped (next to the unit ridge it is nil)
SKLEARN_TOL, SKLEARN_MAX_ITER = 1e-10, 10_000  # the reference: lbfgs run to agree within ~1e-4
SINGLE_THREAD_MAX = 256  # unknowns per problem up to which CPU solves run on one thread (module docstring)
SINGLE_THREAD_WORK = 2**24  # multiply-adds up to which a CPU scoring product runs on one thread


@dataclass(frozen=True)
class Standardizer:
    """Per-problem feature mean and scale, fitted on each problem's training rows (``(P, D)`` each).

    Same rule as scikit-learn's ``StandardScaler``: population std, and scale 1 for (numerically) constant
    features, so a feature that does not vary in a tiny support set is centred, not blown up.
    """

    mean: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, X: Tensor, mask: Tensor) -> Standardizer:
        """``X`` (P, n, D) padded batch; ``mask`` (P, n) marks the real training rows."""
        return cls.fit_transform(X.clone(), mask)[0]

    @classmethod
    def fit_transform(cls, X: Tensor, mask: Tensor) -> tuple[Standardizer, Tensor]:
        """Fit on the masked rows and standardise ``X`` in place (pass a scratch copy); padding becomes 0.

        In place because the batch is the largest array of a solve: no temporaries of its size.
        """
        m = mask.to(X.dtype)
        n = m.sum(1, keepdim=True)
        mean = (m.unsqueeze(1) @ X).squeeze(1) / n
        X.sub_(mean.unsqueeze(1)).mul_(m.unsqueeze(-1))
        var = torch.linalg.vector_norm(X, dim=1).square_() / n
        eps = torch.finfo(X.dtype).eps
        constant = var <= n * eps * var + (n * mean * eps) ** 2  # StandardScaler's bound
        scale = torch.where(constant, torch.ones_like(var), var.sqrt())
        return cls(mean=mean, scale=scale), X.div_(scale.unsqueeze(1))

    @classmethod
    def identity(cls, X: Tensor) -> Standardizer:
        """No standardisation (zero mean, unit scale) for a (P, n, D) batch."""
        shape = (X.shape[0], X.shape[2])
        return cls(mean=X.new_zeros(shape), scale=X.new_ones(shape))

    def transform(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        """Standardise a (P, n, D) batch; rows outside ``mask`` become exact zeros (inert in every sum)."""
        Xs = (X - self.mean.unsqueeze(1)) / self.scale.unsqueeze(1)
        return Xs if mask is None else Xs * mask.unsqueeze(-1).to(Xs.dtype)

    def fold_into(self, coef: Tensor, intercept: Tensor) -> tuple[Tensor, Tensor]:
        """Express a model on standardised features (coef (P, c, D)) in raw feature units."""
        raw = coef / self.scale.unsqueeze(1)
        return raw, intercept - (raw * self.mean.unsqueeze(1)).sum(-1)


@dataclass(frozen=True)
class LogisticFit:
    """Fitted probes in raw feature units: ``coef`` (P, c, D); ``intercept``, ``C``, ``n_iter``, ``converged``
    (P, c), for P problems and c values of C."""

    coef: Tensor
    intercept: Tensor
    C: Tensor
    n_iter: Tensor
    converged: Tensor

    def decision_function(self, X: Tensor) -> Tensor:
        """Logits (P, c, m) for rows ``X`` shared by all problems (m, D) or per problem (P, m, D)."""
        X = X.to(self.coef)
        small = X.device.type == "cpu" and X.shape[-2] * self.coef.numel() <= SINGLE_THREAD_WORK
        with intra_op_threads(1 if small else None):
            if X.dim() == 2:
                return torch.einsum("md,pcd->pcm", X, self.coef) + self.intercept.unsqueeze(-1)
            return torch.einsum("pmd,pcd->pcm", X, self.coef) + self.intercept.unsqueeze(-1)

    def predict_proba(self, X: Tensor) -> Tensor:
        """Probability of the positive class (P, c, m)."""
        return torch.sigmoid(self.decision_function(X))

    def __getitem__(self, problems: slice | Tensor | list[int]) -> LogisticFit:
        """The fits of a subset of problems (all their C)."""
        return LogisticFit(*(getattr(self, name)[problems] for name in _FIELDS))


_FIELDS = ("coef", "intercept", "C", "n_iter", "converged")


def class_weights(y: Tensor, mask: Tensor, mode: str | None = "balanced") -> Tensor:
    """Sample weights (P, n): balanced ``n / (2 n_c)`` on each problem's own rows, or 1; 0 off the mask."""
    m = mask.to(DTYPE)
    if mode is None:
        return m
    if mode != "balanced":
        raise ValueError(f"class_weight must be 'balanced' or None, got {mode!r}")
    pos = (y * m).sum(1, keepdim=True)
    n = m.sum(1, keepdim=True)
    neg = n - pos
    lacking = ((pos == 0) | (neg == 0)).squeeze(1).nonzero().flatten()
    if lacking.numel():
        raise ValueError(f"problems {lacking[:5].tolist()} have a single class; a probe needs both")
    return m * torch.where(y > 0, n / (2 * pos), n / (2 * neg))


def _use_kernel(n: int, D: int) -> bool:
    """A kernel Newton step costs ~n^3/3, a primal one ~n D^2 + D^3/3: take the cheaper form."""
    return n**3 < 3 * n * D**2 + D**3


def _logits(G: Tensor, theta: Tensor) -> Tensor:
    """Logits (A, n) of parameters (A, r+1), the last entry the intercept; G is the data or the kernel."""
    return (G @ theta[:, :-1, None]).squeeze(-1) + theta[:, -1:]


def _penalty_terms(kernel: bool, theta: Tensor, step: Tensor, f: Tensor, df: Tensor) -> tuple[Tensor, ...]:
    """w'Qw, w'Q dw and dw'Q dw (Q = K in kernel form, the identity in primal), with w = theta[:, :-1].

    In kernel form K a is read off the logits (f = K a + b), so the line search needs no extra products.
    """
    w, dw = theta[:, :-1], step[:, :-1]
    Qw, Qdw = (f - theta[:, -1:], df - step[:, -1:]) if kernel else (w, dw)
    return (w * Qw).sum(-1), (w * Qdw).sum(-1), (dw * Qdw).sum(-1)


def _objective(f: Tensor, y: Tensor, sw: Tensor, C: Tensor, penalty: Tensor) -> Tensor:
    """C * sum w * logloss + 0.5 * penalty, with f (..., A, n) logits; exact softplus via logaddexp."""
    loss = torch.logaddexp(torch.zeros_like(f), f) - y * f
    return C * (sw * loss).sum(-1) + 0.5 * penalty


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: unchanged), restoring the count after."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solve_threads(unknowns: int, device: torch.device) -> int | None:
    """Intra-op threads for problems of ``unknowns`` parameters: 1 for small CPU systems, else unchanged."""
    return 1 if device.type == "cpu" and unknowns <= SINGLE_THREAD_MAX else None


def _cholesky(H: Tensor) -> Tensor:
    """Cholesky factor; a matrix that is positive definite only in exact arithmetic gets a tiny ridge."""
    L, info = torch.linalg.cholesky_ex(H)
    bad = info > 0
    if bad.any():
        jitter = 1e-10 * H[bad].diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1.0)
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        L[bad] = torch.linalg.cholesky(H[bad] + jitter[:, None, None] * eye)
    return L


def _chol_solve(L: Tensor, b: Tensor) -> Tensor:
    """Solve (L L^T) x = b; two triangular solves are several times faster than cholesky_solve on CPU."""
    half = torch.linalg.solve_triangular(L, b, upper=False)
    return torch.linalg.solve_triangular(L.transpose(1, 2), half, upper=True)


def _primal_direction(X: Tensor, g: Tensor, h: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Newton step and its slope (gradient . step) with coef = theta[:, :-1] over D features."""
    grad = torch.cat([(g.unsqueeze(1) @ X).squeeze(1) + theta[:, :-1], g.sum(1, keepdim=True)], 1)
    Xh = torch.cat([X, torch.ones_like(X[..., :1])], -1) * h.sqrt().unsqueeze(-1)
    H = Xh.transpose(1, 2) @ Xh
    H.diagonal(dim1=1, dim2=2)[:, :-1] += 1.0  # the intercept is not penalised
    step = -_chol_solve(_cholesky(H), grad.unsqueeze(-1)).squeeze(-1)
    return step, (grad * step).sum(-1)


def _kernel_direction(K: Tensor, g: Tensor, h: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Newton step and slope with coef = X^T a, a = theta[:, :-1], over the n x n kernel K.

    The Newton system, reduced by K, reads (I + H K) da + h db = -(g + a) with H = diag(h), plus the
    intercept row. (I + H K)^{-1} v = v - s * M^{-1} (s * K v) with s = sqrt(h) and M = I + s K s, symmetric
    with eigenvalues >= 1: one well-conditioned Cholesky per step and no division by vanishing curvatures.
    The intercept is eliminated exactly through its Schur complement.
    """
    a, s, g_b = theta[:, :-1], h.sqrt(), g.sum(1)
    M = s.unsqueeze(-1) * K * s.unsqueeze(1)
    M.diagonal(dim1=1, dim2=2).add_(1.0)
    v = torch.stack([g + a, h], -1)
    Kv = K @ v  # K (g + a) is the gradient in a
    u = v - s.unsqueeze(-1) * _chol_solve(torch.linalg.cholesky(M), s.unsqueeze(-1) * Kv)
    hKu = (Kv[..., 1:] * u).sum(1)  # h^T K u, K symmetric
    schur = (h.sum(1) - hKu[:, 1]).clamp_min(torch.finfo(h.dtype).tiny)
    db = (hKu[:, 0] - g_b) / schur
    da = -u[..., 0] - u[..., 1] * db.unsqueeze(-1)
    return torch.cat([da, db.unsqueeze(-1)], 1), (da * Kv[..., 0]).sum(-1) + db * g_b


def _step_size(f: Tensor, df: Tensor, penalty: tuple[Tensor, ...], y: Tensor, sw: Tensor, C: Tensor,
               slope: Tensor) -> Tensor:
    """Largest t in {1, 1/2, ..., 2**-29} meeting Armijo's condition per problem, 0 if none."""
    ww, wdw, dwdw = penalty
    phi0 = _objective(f, y, sw, C, ww)
    bound = phi0 + 64 * torch.finfo(phi0.dtype).eps * phi0.abs()  # rounding floor near the optimum
    t = torch.ones_like(phi0)
    for _ in range(N_BACKTRACK):
        phi = _objective(f + t[:, None] * df, y, sw, C, ww + 2 * t * wdw + t**2 * dwdw)
        ok = phi <= bound + ARMIJO * t * slope
        if ok.all():
            break
        t = torch.where(ok, t, t / 2)
    return torch.where(ok, t, torch.zeros_like(t))


def _solve(
    G: Tensor, kernel: bool, y: Tensor, sw: Tensor, C: Tensor, theta: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Damped Newton from ``theta`` (P, r+1) for one C per problem (P,): theta, iterations, converged.

    Only unfinished problems are computed each step. One stops once its squared Newton decrement (about twice
    the remaining objective gap) falls below ``tol`` (the step that got it there is still taken) or once no
    step lowers the objective beyond rounding: it then sits at the optimum to machine precision.
    """
    direction = _kernel_direction if kernel else _primal_direction
    theta = theta.clone()
    n_iter = torch.zeros(C.shape[0], dtype=torch.long, device=G.device)
    done = torch.zeros(C.shape[0], dtype=torch.bool, device=G.device)
    for _ in range(max_iter):
        act = (~done).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        every = act.numel() == done.numel()  # no gather copies while all problems run
        Ga, ya, swa, Ca, th = (G, y, sw, C, theta) if every else (G[act], y[act], sw[act], C[act], theta[act])
        f = _logits(Ga, th)
        p = torch.sigmoid(f)
        g, h = Ca[:, None] * swa * (p - ya), Ca[:, None] * swa * p * (1 - p)
        h = torch.where(h > CURVATURE_FLOOR, h, 0.0)  # denormals slow CPU math 100x and weigh nothing
        step, slope = direction(Ga, g, h, th)
        df = _logits(Ga, step)
        t = _step_size(f, df, _penalty_terms(kernel, th, step, f, df), ya, swa, Ca, slope)
        theta[act] = th + t[:, None] * step
        n_iter[act] += 1
        done[act] = (-slope <= tol) | (t == 0)
    return theta, n_iter, done


def _solve_path(
    G: Tensor, kernel: bool, y: Tensor, sw: Tensor, Cs: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve each problem's C grid (P, c) in ascending order, each C warm-started from the previous one.

    Along a log-spaced path a solution is a few Newton steps from its neighbour, so the whole grid costs about
    what the largest C alone would from scratch. Returns parameters (P, c, r+1), iterations, converged (P, c).
    """
    P, c = Cs.shape
    rows = torch.arange(P, device=G.device)
    pos = (sw * y).sum(1)
    theta = G.new_zeros(P, G.shape[-1] + 1)
    theta[:, -1] = (pos / (sw.sum(1) - pos)).log()  # the optimum of the intercept alone
    out = G.new_empty(P, c, theta.shape[1])
    n_iter = torch.empty(P, c, dtype=torch.long, device=G.device)
    converged = torch.empty(P, c, dtype=torch.bool, device=G.device)
    for col in Cs.argsort(1).T:
        theta, steps, ok = _solve(G, kernel, y, sw, Cs[rows, col], theta, tol, max_iter)
        out[rows, col], n_iter[rows, col], converged[rows, col] = theta, steps, ok
    return out, n_iter, converged


def fit_batch(
    X: Tensor,
    y: Tensor,
    mask: Tensor,
    Cs: Tensor | np.ndarray | list[float],
    *,
    class_weight: str | None = "balanced",
    standardize: bool = True,
    tol: float = 1e-12,
    max_iter: int = 100,
    overwrite: bool = False,
) -> LogisticFit:
    """Fit P problems x c values of C at once.

    ``X`` (P, n, D) padded training rows, ``y`` (P, n) labels 0/1, ``mask`` (P, n) real rows, ``Cs`` a shared
    grid (c,) or one grid per problem (P, c). Runs on ``X``'s device in float64; ``overwrite`` lets a float64
    ``X`` be standardised in place instead of copied.
    """
    n, D = X.shape[1:]
    with intra_op_threads(solve_threads((n if _use_kernel(n, D) else D) + 1, X.device)):
        return _fit_batch(X, y, mask, Cs, class_weight, standardize, tol, max_iter, overwrite)


def _fit_batch(X: Tensor, y: Tensor, mask: Tensor, Cs: Tensor | np.ndarray | list[float], class_weight: str | None,
               standardize: bool, tol: float, max_iter: int, overwrite: bool) -> LogisticFit:
    y, mask = y.to(device=X.device, dtype=DTYPE), mask.to(device=X.device, dtype=torch.bool)
    Cs = torch.as_tensor(Cs, dtype=DTYPE, device=X.device)
    Cs = Cs.expand(X.shape[0], -1) if Cs.dim() == 1 else Cs
    X = X.to(DTYPE, copy=not overwrite)
    if standardize:
        scaler, Xs = Standardizer.fit_transform(X, mask)
    else:
        scaler, Xs = Standardizer.identity(X), X.mul_(mask.unsqueeze(-1).to(X.dtype))
    sw = class_weights(y, mask, class_weight)
    kernel = _use_kernel(*Xs.shape[1:])
    G = Xs @ Xs.transpose(1, 2) if kernel else Xs
    theta, n_iter, converged = _solve_path(G, kernel, y, sw, Cs, tol, max_iter)
    coef = theta[..., :-1] @ Xs if kernel else theta[..., :-1]
    coef, intercept = scaler.fold_into(coef, theta[..., -1])
    return LogisticFit(coef, intercept, Cs, n_iter, converged)


def fit_indexed(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    index: Tensor | np.ndarray,
    Cs: Tensor | np.ndarray | list[float],
    *,
    mask: Tensor | np.ndarray | None = None,
    device: str | torch.device | None = None,
    max_elements: int = MAX_ELEMENTS,
    **options,
) -> LogisticFit:
    """Fit problems whose training rows are ``index`` (P, n) into one shared ``features`` matrix (N, D).

    Few-shot problems select a handful of rows of one cached matrix, so nothing is copied up front: each chunk
    of problems is gathered on its own, sized so its largest work arrays stay near ``max_elements``.
    ``labels`` (N,) are 0/1; ``mask`` (P, n) marks real rows when problems have different sizes (padding
    entries of ``index`` may point anywhere). ``options`` go to `fit_batch`.
    """
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)  # cast per gathered chunk below
    index = torch.as_tensor(index, dtype=torch.long, device=features.device)
    mask = torch.ones_like(index, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    Cs = torch.as_tensor(Cs, dtype=DTYPE)
    n, D = index.shape[1], features.shape[1]
    per_problem = n * (min(n, D) + 1) + (n + Cs.shape[-1]) * D  # Hessian or kernel, the rows, coef
    size = max(1, max_elements // per_problem)
    fits = []
    for start in range(0, index.shape[0], size):
        rows = index[start : start + size]
        grid = Cs if Cs.dim() == 1 else Cs[start : start + size]
        X, y = features[rows].to(device, DTYPE), labels[rows].to(device)
        fits.append(fit_batch(X, y, mask[start : start + size].to(device), grid, overwrite=True, **options))
    return _concat(fits)


def _concat(fits: list[LogisticFit]) -> LogisticFit:
    return LogisticFit(*(torch.cat([getattr(f, name) for f in fits]) for name in _FIELDS))


def fit_sklearn(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    index: Tensor | np.ndarray,
    Cs: Tensor | np.ndarray | list[float],
    *,
    mask: Tensor | np.ndarray | None = None,
    class_weight: str | None = "balanced",
    tol: float = SKLEARN_TOL,
    max_iter: int = SKLEARN_MAX_ITER,
) -> LogisticFit:
    """The reference path, same arguments and result as `fit_indexed`.

    One scikit-learn ``StandardScaler`` + ``LogisticRegression`` (lbfgs) per problem and C, the C grid walked
    upwards with warm starts; coefficients folded back to raw feature units like the torch path's.
    """
    X, y = np.asarray(features), np.asarray(labels)
    index = np.asarray(index, dtype=np.int64)
    mask = np.ones(index.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    grid = np.asarray(Cs, dtype=np.float64)
    grid = np.broadcast_to(grid, (index.shape[0], grid.shape[-1]))
    coef = np.zeros((*grid.shape, X.shape[1]))
    intercept, n_iter = np.zeros(grid.shape), np.zeros(grid.shape, dtype=np.int64)
    for p, rows in enumerate(index):
        Xp, yp = X[rows[mask[p]]].astype(np.float64), y[rows[mask[p]]]
        scaler = StandardScaler().fit(Xp)
        Xs = scaler.transform(Xp)
        model = LogisticRegression(class_weight=class_weight, tol=tol, max_iter=max_iter, warm_start=True)
        for j in np.argsort(grid[p], kind="stable"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # reported through `converged`
                model.set_params(C=float(grid[p, j])).fit(Xs, yp)
            coef[p, j] = model.coef_[0] / scaler.scale_
            intercept[p, j] = model.intercept_[0] - coef[p, j] @ scaler.mean_
            n_iter[p, j] = model.n_iter_[0]
    as_t = torch.from_numpy
    return LogisticFit(as_t(coef), as_t(intercept), as_t(grid.copy()), as_t(n_iter), as_t(n_iter < max_iter))
