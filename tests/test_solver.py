"""The batched logistic solver against scikit-learn: same objective, same probabilities, both solve forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from featcache import solver
from featcache.solver import Standardizer, class_weights, fit_batch, fit_indexed, fit_sklearn

CS = (1e-3, 1e-1, 1.0)


def _problem(n: int, D: int, positive_rate: float, seed: int, signal: float = 1.5):
    """Gaussian features with a class shift along a random direction, offset and uneven scales."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_rate).astype(np.int64)
    y[:2] = (0, 1)
    direction = rng.normal(size=D) / np.sqrt(D)
    X = rng.normal(size=(n, D)) + signal * np.outer(y, direction) * np.sqrt(D) / 4
    X = X * rng.uniform(0.5, 3.0, size=D) + rng.normal(size=D) * 5
    return X, y, rng.normal(size=(50, D)) * X.std(0) + X.mean(0)


def _sklearn_proba(X, y, X_new, C):
    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=10_000)
    model.fit(scaler.transform(X), y)
    return model.predict_proba(scaler.transform(X_new))[:, 1]


def _ours(X, y):
    Xt, yt = torch.from_numpy(X)[None], torch.from_numpy(y)[None]
    return fit_batch(Xt, yt, torch.ones_like(yt, dtype=torch.bool), CS)


@pytest.mark.parametrize(
    ("n", "D", "rate", "kernel"),
    [
        (40, 10, 0.5, False),  # tiny and balanced
        (200, 20, 0.15, False),  # imbalanced, primal form
        (16, 2048, 0.5, True),  # few-shot: small n, large D
        (24, 512, 0.25, True),  # few-shot, imbalanced support
        (1500, 64, 0.3, False),  # full data: large n
    ],
)
def test_probabilities_match_sklearn_lbfgs(n, D, rate, kernel):
    assert solver._use_kernel(n, D) is kernel  # both solve forms are covered
    X, y, X_new = _problem(n, D, rate, seed=n + D)
    fit = _ours(X, y)
    assert fit.converged.all()
    proba = fit.predict_proba(torch.from_numpy(X_new))[0].numpy()
    for j, C in enumerate(CS):
        np.testing.assert_allclose(proba[j], _sklearn_proba(X, y, X_new, C), atol=1e-4, err_msg=f"C={C}")


def test_optimum_satisfies_the_gradient_condition_on_separable_data():
    """n << D with C = 100: separable, yet the L2 objective has a unique optimum, and Newton finds it."""
    X, y, _ = _problem(12, 300, 0.5, seed=3, signal=4.0)
    C = 100.0
    fit = fit_indexed(X, y, np.arange(12)[None], [C])
    assert fit.converged.all() and torch.isfinite(fit.coef).all()
    scaler = StandardScaler().fit(X)
    w = fit.coef[0, 0].numpy() * scaler.scale_  # back to standardised units
    b = fit.intercept[0, 0].item() + fit.coef[0, 0].numpy() @ scaler.mean_
    Xs = scaler.transform(X)
    sw = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)[y]
    residual = C * sw * (1 / (1 + np.exp(-(Xs @ w + b))) - y)
    gradient = np.r_[Xs.T @ residual + w, residual.sum()]
    assert np.abs(gradient).max() < 1e-6


def test_padded_batch_equals_each_problem_alone():
    """Problems of different sizes share one padded batch; masked rows must not leak into any sum."""
    problems = [_problem(n, 30, 0.4, seed=n) for n in (10, 25, 60)]
    n_max = 60
    X = torch.zeros(3, n_max, 30, dtype=torch.float64)
    y = torch.zeros(3, n_max, dtype=torch.long)
    mask = torch.zeros(3, n_max, dtype=torch.bool)
    for i, (Xi, yi, _) in enumerate(problems):
        rows = slice(0, len(yi))
        X[i, rows], y[i, rows], mask[i, rows] = torch.from_numpy(Xi), torch.from_numpy(yi), True
        X[i, len(yi) :] = 1e3  # garbage in the padding
    together = fit_batch(X, y, mask, CS)
    for i, (Xi, yi, _) in enumerate(problems):
        alone = _ours(Xi, yi)
        torch.testing.assert_close(together.coef[i], alone.coef[0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(together.intercept[i], alone.intercept[0], rtol=1e-7, atol=1e-9)


def test_indexed_fit_chunks_and_per_problem_grids():
    """Rows indexed in one shared matrix, chunked, equal the padded batch; a (P, c) grid equals a (c,) one."""
    X, y, _ = _problem(300, 64, 0.3, seed=7)
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    index = np.stack([np.r_[rng.choice(pos, 8, replace=False), rng.choice(neg, 8, replace=False)]
                      for _ in range(9)])
    X = X.astype(np.float32)  # as stored; cast to float64 per chunk
    shared = fit_indexed(X, y, index, CS, max_elements=1)  # one problem per chunk
    rows = torch.from_numpy(index)
    batch = fit_batch(torch.from_numpy(X)[rows], torch.from_numpy(y)[rows], torch.ones_like(rows).bool(), CS)
    torch.testing.assert_close(shared.coef, batch.coef)
    per_problem = fit_indexed(X, y, index, np.tile(np.array(CS)[::-1], (9, 1)))  # descending, per problem
    torch.testing.assert_close(per_problem.coef, shared.coef.flip(1), rtol=1e-6, atol=1e-8)


def test_sklearn_reference_path_agrees():
    X, y, X_new = _problem(120, 40, 0.3, seed=11)
    index = np.stack([np.arange(0, 80), np.arange(40, 120)])
    ours = fit_indexed(X, y, index, CS)
    reference = fit_sklearn(X, y, index, CS)
    assert reference.converged.all()
    new = torch.from_numpy(X_new)
    torch.testing.assert_close(ours.predict_proba(new), reference.predict_proba(new), rtol=0, atol=1e-4)
    direct = _sklearn_proba(X[index[1]], y[index[1]], X_new, CS[2])
    np.testing.assert_allclose(reference.predict_proba(new)[1, 2].numpy(), direct, atol=1e-4)


def test_standardizer_matches_standard_scaler_on_masked_rows():
    X, _, _ = _problem(20, 6, 0.5, seed=1)
    X[:, 2] = 4.0  # constant feature: scale 1, as StandardScaler
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, :13] = True
    scaler = Standardizer.fit(torch.from_numpy(X)[None], mask)
    reference = StandardScaler().fit(X[:13])
    np.testing.assert_allclose(scaler.mean[0].numpy(), reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(scaler.scale[0].numpy(), reference.scale_, rtol=1e-12)
    standardised = scaler.transform(torch.from_numpy(X)[None], mask)[0].numpy()
    np.testing.assert_allclose(standardised[:13], reference.transform(X[:13]), atol=1e-12)
    assert (standardised[13:] == 0).all()


def test_balanced_weights_count_each_problems_own_rows():
    y = torch.tensor([[1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    weights = class_weights(y, mask)
    for i in range(2):
        yi = y[i][mask[i]].numpy()
        expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=yi)[yi]
        np.testing.assert_allclose(weights[i][mask[i]].numpy(), expected)
    assert (weights[0, 4:] == 0).all()
    with pytest.raises(ValueError, match="single class"):
        class_weights(torch.tensor([[1, 1, 1]]), torch.ones(1, 3, dtype=torch.bool))


def test_decision_function_shared_and_per_problem_rows_agree():
    X, y, X_new = _problem(60, 12, 0.5, seed=5)
    fit = fit_indexed(X, y, np.stack([np.arange(40), np.arange(20, 60)]), CS)
    new = torch.from_numpy(X_new)
    torch.testing.assert_close(fit.decision_function(new), fit.decision_function(new.expand(2, -1, -1)))
    torch.testing.assert_close(fit[1:].coef, fit.coef[1:])


def test_singular_curvature_gets_a_ridge_not_a_crash():
    H = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # positive semi-definite only
    L = solver._cholesky(H)
    assert torch.isfinite(L).all()
    torch.testing.assert_close(L @ L.transpose(1, 2), H, atol=1e-8, rtol=0)


def _threads_during_solve(monkeypatch) -> list[int]:
    seen: list[int] = []
    solve_path = solver._solve_path

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return solve_path(*args, **kwargs)

    monkeypatch.setattr(solver, "_solve_path", spy)
    return seen


def test_small_systems_solve_on_one_thread_large_ones_keep_theirs(monkeypatch):
    """Few-shot systems run single-threaded (OpenMP regions per tiny LAPACK call stall on a loaded machine);
    full-data primal systems keep the caller's threads; the caller's count is restored either way."""
    seen = _threads_during_solve(monkeypatch)
    X, y, X_new = _problem(16, 600, 0.5, seed=2)  # kernel form, 17 unknowns
    X_big, y_big, _ = _problem(2000, solver.SINGLE_THREAD_MAX + 1, 0.3, seed=4)  # primal form, 258 unknowns
    with solver.intra_op_threads(2):
        small = fit_indexed(X, y, np.arange(16)[None], CS)
        fit_indexed(X_big, y_big, np.arange(2000)[None], [1.0])
        assert torch.get_num_threads() == 2
    assert seen == [1, 2]
    monkeypatch.setattr(solver, "SINGLE_THREAD_MAX", 0)  # the former rule: every solve on all threads
    monkeypatch.setattr(solver, "SINGLE_THREAD_WORK", 0)
    with solver.intra_op_threads(2):
        threaded = fit_indexed(X, y, np.arange(16)[None], CS)
    assert seen[-1] == 2
    torch.testing.assert_close(small.coef, threaded.coef, rtol=1e-9, atol=1e-12)
    new = torch.from_numpy(X_new)
    torch.testing.assert_close(small.predict_proba(new), threaded.predict_proba(new), rtol=0, atol=1e-12)


def test_thread_count_is_restored_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="single class"):
        fit_batch(torch.randn(1, 4, 3), torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), CS)
    assert torch.get_num_threads() == before
