"""The analytic gradient of the profiled objective against central finite differences, and the
(projected) gradient at the fitted optimum."""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import lmefast

MODELS: dict[str, dict[str, Any]] = {
    "sleep_rs": {"data": "sleepstudy", "formula": "Reaction ~ Days", "groups": "Subject",
                 "re_formula": "~Days"},
    "dietox_cat": {"data": "dietox", "formula": "Weight ~ Time + Cu", "groups": "Pig", "re_formula": "~Time"},
    "pastes": {"data": "Pastes", "formula": "strength ~ 1", "groups": "batch", "re_formula": "1",
               "vc_formula": {"cask": "0 + C(cask)"}},
    "sleep_zc": {"data": "sleepstudy", "formula": "Reaction ~ Days", "groups": "Subject", "re_formula": "1",
                 "vc_formula": {"Days": "0 + Days"}},
    "dyestuff2": {"data": "Dyestuff2", "formula": "Yield ~ 1", "groups": "Batch"},
}
FD_MODELS = ["sleep_rs", "dietox_cat", "pastes", "sleep_zc"]


def make_model(data: Callable, name: str) -> lmefast.MixedLM:
    spec = dict(MODELS[name])
    df = data(spec.pop("data"))
    formula = spec.pop("formula")
    return lmefast.mixedlm(formula, df, **spec)


def random_thetas(model: lmefast.MixedLM, seed: int, count: int) -> list[np.ndarray]:
    """θ with diagonal entries in (0.2, 2) and off-diagonal ones around 0 (scale 0.3)."""
    rng = np.random.default_rng(seed)
    diag = model.spec.theta_map.diagonal_mask()
    out = []
    for _ in range(count):
        th = np.where(diag, rng.uniform(0.2, 2.0, diag.size), rng.normal(0.0, 0.3, diag.size))
        out.append(th)
    return out


def fd_gradient(f: Callable[[np.ndarray], float], theta: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Fourth-order central differences (Richardson on the symmetric quotient)."""
    g = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        d1 = f(theta + e) - f(theta - e)
        d2 = f(theta + 2 * e) - f(theta - 2 * e)
        g[i] = (8 * d1 - d2) / (12 * h)
    return g


@pytest.mark.parametrize("name", FD_MODELS)
def test_gradient_matches_finite_differences(data: Callable, name: str, reml: bool) -> None:
    model = make_model(data, name)
    obj = model.objective(reml)
    for theta in random_thetas(model, seed=zlib.crc32(name.encode()) + int(reml), count=4):
        sol = obj.solve(theta, want_grad=True)
        assert sol.grad is not None and sol.grad.shape == theta.shape
        fd = fd_gradient(obj, theta)
        scale = max(float(np.max(np.abs(fd))), 1.0)
        err = np.max(np.abs(sol.grad - fd))
        assert err <= 1e-5 * scale, f"θ={theta}: analytic {sol.grad}, finite differences {fd}"
        # every access path gives the same gradient and value
        v, g = obj.value_and_grad(theta)
        assert v == sol.objective
        np.testing.assert_array_equal(g, sol.grad)
        assert obj(theta) == sol.objective
        assert model.loglike_theta(theta, reml) == pytest.approx(-0.5 * sol.objective, rel=1e-15)


@pytest.mark.parametrize("name", FD_MODELS)
def test_gradient_does_not_depend_on_want_grad(data: Callable, name: str, reml: bool) -> None:
    """Asking for the gradient changes nothing else in the solution."""
    model = make_model(data, name)
    obj = model.objective(reml)
    theta = random_thetas(model, seed=7, count=1)[0]
    a, b = obj.solve(theta, want_grad=False), obj.solve(theta, want_grad=True)
    assert a.objective == b.objective
    np.testing.assert_array_equal(a.beta, b.beta)
    assert a.sigma2 == b.sigma2
    assert obj.gradient(a) == pytest.approx(b.grad, rel=1e-15, abs=0)


@pytest.mark.parametrize("name", [*FD_MODELS, "dyestuff2"])
def test_projected_gradient_vanishes_at_optimum(data: Callable, name: str, reml: bool) -> None:
    model = make_model(data, name)
    res = model.fit(reml=reml)
    obj = model.objective(reml)
    theta = res.theta
    g = obj.solve(theta, want_grad=True).grad
    lower = model.spec.theta_map.lower_bounds()
    at_bound = theta <= lower
    pg = np.where(at_bound & (g > 0), 0.0, g)
    np.testing.assert_allclose(res.optsummary.projected_gradient, pg, rtol=1e-12, atol=1e-300)
    assert np.max(np.abs(pg), initial=0.0) < 1e-3, f"projected gradient at θ̂ = {pg}"
    # at a bound the objective must increase into the feasible region
    assert np.all(g[at_bound] >= 0)
    # the finite-difference gradient agrees at the optimum too (on the free coordinates)
    free = ~at_bound
    if free.any():
        fd = fd_gradient(obj, theta)
        np.testing.assert_allclose(g[free], fd[free], atol=1e-5 * max(1.0, abs(res.objective) * 1e-3))


def test_singular_fit_is_at_the_bound(data: Callable, reml: bool) -> None:
    """Dyestuff2: θ̂ = 0 and the one-sided derivative there is ≥ 0 (a genuine boundary optimum)."""
    model = make_model(data, "dyestuff2")
    res = model.fit(reml=reml)
    assert res.theta[0] == 0.0
    obj = model.objective(reml)
    g = obj.solve(res.theta, want_grad=True).grad
    fd_one_sided = (obj(np.array([1e-5])) - obj(np.array([0.0]))) / 1e-5
    assert g[0] >= 0 and fd_one_sided >= 0
