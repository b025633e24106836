"""The profiled objective of models with several grouping factors (lmefast.multi, through lmer_model):
the analytic gradient against finite differences, and the objective, β̂, σ̂² and conditional modes against
a dense NumPy computation written here from first principles.

Model: y = Xβ + Zb + ε, b ~ N(0, σ²ΛΛ'), ε ~ N(0, σ²I); Λ = blockdiag over terms of I_{m_j} ⊗ T_j. With
V₀ = I + ZΛΛ'Z', profiled over β and σ²:
    β̂ = (X'V₀⁻¹X)⁻¹X'V₀⁻¹y,  r = y − Xβ̂,  σ̂² = r'V₀⁻¹r / d  (d = n for ML, n − p for REML)
    ML:   −2ℓ = d log(2πσ̂²) + log|V₀| + d
    REML: −2ℓ_R = d log(2πσ̂²) + log|V₀| + log|X'V₀⁻¹X| + d
    conditional modes b̂ = ΛΛ'Z'V₀⁻¹r.
θ lists the terms by number of levels, most first, and within a term the free entries of its lower
triangular T column by column.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import pytest
from conftest import read_data
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_gradient import fd_gradient

import lmefast
from lmefast.model import MixedLM
from lmefast.multi import BlockedEngine

LOG_2PI = np.log(2 * np.pi)


# -- data --------------------------------------------------------------------------------------------------
@cache
def _sleep_crossed() -> pd.DataFrame:
    """sleepstudy with two random factors crossed with Subject: grp (6 levels, an effect and a slope of its
    own) and grp30 (30 levels, more than Subject's 18)."""
    df = read_data("sleepstudy")
    rng = np.random.default_rng(20240531)
    df["grp"] = rng.permutation(np.arange(len(df)) % 6)
    df["grp30"] = [f"k{v}" for v in rng.permutation(np.arange(len(df)) % 30)]
    eff, slope = rng.normal(0, 15, 6), rng.normal(0, 3, 6)
    df["Reaction"] = df["Reaction"] + eff[df["grp"]] + slope[df["grp"]] * df["Days"]
    return df


@cache
def _three_factors() -> pd.DataFrame:
    """Synthetic: three crossed factors a (25 levels), b (8), c (4), a covariate x with a random slope by b."""
    rng = np.random.default_rng(7)
    n = 400
    a, b, c = rng.integers(0, 25, n), rng.integers(0, 8, n), rng.integers(0, 4, n)
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + rng.normal(0, 1.0, 25)[a] + rng.normal(0, 0.7, 8)[b]
         + rng.normal(0, 0.4, 8)[b] * x + rng.normal(0, 1.5, 4)[c] + rng.normal(size=n))
    return pd.DataFrame({"y": y, "x": x, "a": [f"a{v}" for v in a], "b": b, "c": [f"c{v}" for v in c]})


MODELS: dict[str, tuple[Callable[[], pd.DataFrame], str]] = {
    "penicillin": (lambda: read_data("Penicillin"), "diameter ~ 1 + (1|plate) + (1|sample)"),
    "pastes": (lambda: read_data("Pastes"), "strength ~ 1 + (1|batch/cask)"),
    "sleep_slopes": (_sleep_crossed, "Reaction ~ Days + (Days|Subject) + (Days|grp)"),
    "sleep_zc": (_sleep_crossed, "Reaction ~ Days + (1|Subject) + (0 + Days|grp)"),
    "sleep_slope_trailing": (_sleep_crossed, "Reaction ~ Days + (Days|Subject) + (1|grp30)"),
    "sleep_scalar_first": (_sleep_crossed, "Reaction ~ Days + (1|Subject) + (Days|grp)"),
    "sleep_uncorrelated": (_sleep_crossed, "Reaction ~ Days + (Days||Subject) + (1 + Days||grp)"),
    "three_factors": (_three_factors, "y ~ x + (1|a) + (1 + x|b) + (1|c)"),
    "three_factors_first_slope": (_three_factors, "y ~ x + (1 + x|a) + (1|b) + (0 + x|c)"),
}


@cache
def multi_model(name: str) -> MixedLM:
    data, formula = MODELS[name]
    model = lmefast.lmer_model(formula, data())
    assert isinstance(model.engine, BlockedEngine)
    return model


def random_thetas(model: MixedLM, seed: int, count: int) -> list[np.ndarray]:
    """θ with diagonal entries in (0.2, 2) and off-diagonal ones around 0 (scale 0.3)."""
    rng = np.random.default_rng(seed)
    diag = model.theta_map.diagonal_mask()
    return [np.where(diag, rng.uniform(0.2, 2.0, diag.size), rng.normal(0.0, 0.3, diag.size))
            for _ in range(count)]


# -- gradient ----------------------------------------------------------------------------------------------
def test_theta_layout() -> None:
    """Number of θ entries per model: lower triangles of correlated terms, diagonals of uncorrelated ones."""
    sizes = {"penicillin": 2, "pastes": 2, "sleep_slopes": 6, "sleep_zc": 2, "sleep_slope_trailing": 4,
             "sleep_scalar_first": 4, "sleep_uncorrelated": 4, "three_factors": 5,
             "three_factors_first_slope": 5}
    for name, size in sizes.items():
        model = multi_model(name)
        assert model.theta_map.n_theta == size, name
        assert [t.m for t in model.terms] == sorted((t.m for t in model.terms), reverse=True)
        np.testing.assert_array_equal(model.theta_map.start(), model.theta_map.diagonal_mask().astype(float))


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_matches_finite_differences(name: str, reml: bool) -> None:
    model = multi_model(name)
    obj = model.objective(reml)
    for theta in random_thetas(model, seed=zlib.crc32(name.encode()) + int(reml), count=3):
        sol = obj.solve(theta, want_grad=True)
        assert sol.grad is not None and sol.grad.shape == theta.shape
        fd = fd_gradient(obj, theta)
        scale = max(float(np.max(np.abs(fd))), 1.0)
        err = float(np.max(np.abs(sol.grad - fd)))
        assert err <= 1e-5 * scale, f"θ={theta}: analytic {sol.grad}, finite differences {fd}"
        # every access path gives the same value and gradient; asking for the gradient changes nothing else
        plain = obj.solve(theta)
        assert plain.objective == sol.objective and plain.sigma2 == sol.sigma2
        np.testing.assert_array_equal(plain.beta, sol.beta)
        v, g = obj.value_and_grad(theta)
        assert v == sol.objective
        np.testing.assert_array_equal(g, sol.grad)
        assert obj(theta) == sol.objective


@pytest.mark.parametrize("name", list(MODELS))
def test_projected_gradient_vanishes_at_optimum(name: str, reml: bool) -> None:
    model = multi_model(name)
    res = model.fit(reml=reml)
    assert res.converged
    obj = model.objective(reml)
    g = obj.solve(res.theta, want_grad=True).grad
    lower = model.theta_map.lower_bounds()
    at_bound = res.theta <= lower
    assert np.all(g[at_bound] >= 0), "the objective decreases into the feasible region at a bound"
    pg = np.where(at_bound, 0.0, g)
    assert np.max(np.abs(pg), initial=0.0) < 1e-3, f"projected gradient at θ̂ = {pg}"
    np.testing.assert_allclose(res.optsummary.projected_gradient, np.where(at_bound & (g > 0), 0.0, g),
                               rtol=1e-10, atol=1e-12)


# -- dense first-principles check --------------------------------------------------------------------------
KINDS = {"1": (1, "1"), "1 + x": (2, "1 + x"), "x": (2, "x"), "0 + x": (1, "0 + x"), "1 + x ||": (2, "1 + x")}


@dataclass
class Crossed:
    df: pd.DataFrame
    factors: list[str]          # in formula order
    kinds: list[str]            # keys of KINDS, per factor
    fixed: str
    theta: np.ndarray           # in θ order (factors by levels, most first)

    @property
    def formula(self) -> str:
        terms = []
        for f, kind in zip(self.factors, self.kinds, strict=True):
            bar = "||" if kind.endswith("||") else "|"
            terms.append(f"({KINDS[kind][1]} {bar} {f})")
        return f"y ~ {self.fixed} + " + " + ".join(terms)

    def order(self) -> list[int]:
        """Factors in θ order: by observed levels, most first (distinct by construction)."""
        return sorted(range(len(self.factors)), key=lambda j: -self.df[self.factors[j]].nunique())


def free_pattern(kind: str) -> list[tuple[int, int]]:
    """Free entries (row, col) of T in θ order: lower triangle by columns; diagonal only for ||."""
    k = KINDS[kind][0]
    if kind.endswith("||"):
        return [(i, i) for i in range(k)]
    return [(r, c) for c in range(k) for r in range(c, k)]


@st.composite
def crossed_cases(draw: st.DrawFn) -> Crossed:
    n_f = draw(st.integers(2, 3), label="factors")
    levels = draw(st.lists(st.integers(2, 7), min_size=n_f, max_size=n_f, unique=True), label="levels")
    kinds = draw(st.lists(st.sampled_from(list(KINDS)), min_size=n_f, max_size=n_f), label="kinds")
    fixed = draw(st.sampled_from(["1", "x", "x + w"]), label="fixed")
    n = draw(st.integers(12, 45), label="n")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.normal(size=n) + 0.3, "w": rng.normal(size=n)})
    y = rng.normal(size=n)
    factors = [f"f{j}" for j in range(n_f)]
    for f, m in zip(factors, levels, strict=True):
        codes = rng.permutation(np.arange(n) % m)  # every level present
        names = rng.permutation([f"{f}L{v}" for v in range(m)])
        df[f] = names[codes]
        y = y + rng.normal(0, 1.5, m)[codes]
    df["y"] = y + 2.0
    p = {"1": 1, "x": 2, "x + w": 3}[fixed]
    assume(all(m * KINDS[kind][0] < n for m, kind in zip(levels, kinds, strict=True)))
    assume(n > p + 2)
    X = np.column_stack([np.ones(n), df["x"], df["w"]])[:, :p]
    assume(np.linalg.matrix_rank(X) == p)
    case = Crossed(df, factors, kinds, fixed, np.zeros(0))
    theta = []
    for j in case.order():
        for r, c in free_pattern(kinds[j]):
            if r == c:
                theta.append(draw(st.one_of(st.just(0.0), st.floats(0.05, 2.0)), label=f"theta_{j}_{r}{c}"))
            else:
                theta.append(draw(st.floats(-1.0, 1.0), label=f"theta_{j}_{r}{c}"))
    case.theta = np.array(theta)
    return case


@dataclass
class Dense:
    objective: float
    beta: np.ndarray
    sigma2: float
    b: dict[str, pd.DataFrame]   # factor → levels × coefficients


def coef_columns(kind: str, x: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    n = x.shape[0]
    if kind in ("1",):
        return [np.ones(n)], ["(Intercept)"]
    if kind in ("0 + x",):
        return [x], ["x"]
    return [np.ones(n), x], ["(Intercept)", "x"]


def dense_fit(case: Crossed, reml: bool, model: MixedLM) -> Dense:
    """First principles; θ's entries are placed where the model's θ map puts them (lme4's
    order, checked on its own by test_lmer_formula.test_theta_is_in_lme4s_order)."""
    df = case.df
    n = len(df)
    y = df["y"].to_numpy()
    p = {"1": 1, "x": 2, "x + w": 3}[case.fixed]
    X = np.column_stack([np.ones(n), df["x"], df["w"]])[:, :p]
    blocks_Z, blocks_L, index = [], [], []
    pos = 0
    for j in case.order():
        f, kind = case.factors[j], case.kinds[j]
        cols, names = coef_columns(kind, df["x"].to_numpy())
        k = len(cols)
        T = np.zeros((k, k))
        term = next(i for i, t in enumerate(model.terms) if t.name == f)
        prow, pcol = model.terms[term].pattern
        assert sorted(zip(prow.tolist(), pcol.tolist(), strict=True)) == sorted(free_pattern(kind))
        for idx, (r, c) in enumerate(zip(prow, pcol, strict=True)):
            T[r, c] = case.theta[model.theta_map.offsets[term] + idx]
            pos += 1
        levels = sorted(df[f].unique())
        fv = df[f].to_numpy()
        Zj = np.column_stack([(fv == lev) * col for lev in levels for col in cols])
        blocks_Z.append(Zj)
        blocks_L.append(np.kron(np.eye(len(levels)), T))
        index.append((f, levels, names))
    assert pos == case.theta.size
    Z = np.hstack(blocks_Z)
    q = Z.shape[1]
    lam = np.zeros((q, q))
    off = 0
    for L in blocks_L:
        lam[off:off + L.shape[0], off:off + L.shape[0]] = L
        off += L.shape[0]
    Sigma = lam @ lam.T
    V0 = np.eye(n) + Z @ Sigma @ Z.T
    V0inv = np.linalg.inv(V0)
    XtVX = X.T @ V0inv @ X
    beta = np.linalg.solve(XtVX, X.T @ V0inv @ y)
    r = y - X @ beta
    d = n - p if reml else n
    sigma2 = float(r @ V0inv @ r) / d
    obj = d * (LOG_2PI + np.log(sigma2)) + np.linalg.slogdet(V0)[1] + d
    if reml:
        obj += np.linalg.slogdet(XtVX)[1]
    u = Sigma @ Z.T @ V0inv @ r
    b, off = {}, 0
    for f, levels, names in index:
        size = len(levels) * len(names)
        b[f] = pd.DataFrame(u[off:off + size].reshape(len(levels), len(names)), index=levels, columns=names)
        off += size
    return Dense(float(obj), beta, sigma2, b)


DENSE_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_against_dense(case: Crossed, want_grad: bool) -> None:
    model = lmefast.lmer_model(case.formula, case.df)
    assert isinstance(model.engine, BlockedEngine)
    assert [t.name for t in model.terms] == [case.factors[j] for j in case.order()]
    assert model.theta_map.n_theta == case.theta.size
    for reml in (True, False):
        dense = dense_fit(case, reml, model)
        obj = model.objective(reml)
        sol = obj.solve(case.theta, want_grad=want_grad)
        scale = max(1.0, abs(dense.objective))
        assert abs(sol.objective - dense.objective) <= 1e-8 * scale, (sol.objective, dense.objective)
        np.testing.assert_allclose(sol.beta, dense.beta, rtol=1e-7, atol=1e-8 * np.max(np.abs(dense.beta)))
        assert sol.sigma2 == pytest.approx(dense.sigma2, rel=1e-7)
        frames = model.engine.modes_by_factor(obj, sol)
        assert list(frames) == [case.factors[j] for j in case.order()]
        for f, expected in dense.b.items():
            got = frames[f]
            assert sorted(map(str, got.index)) == list(expected.index)
            assert list(got.columns) == list(expected.columns)
            got = got.set_axis([str(i) for i in got.index], axis=0).loc[expected.index]
            tol = 1e-7 * max(1.0, float(np.max(np.abs(expected.to_numpy()))))
            np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=0, atol=tol,
                                       err_msg=f"conditional modes of {f} ({'REML' if reml else 'ML'})")


@DENSE_SETTINGS
@given(case=crossed_cases())
def test_objective_and_modes_match_dense(case: Crossed) -> None:
    check_against_dense(case, want_grad=False)


@DENSE_SETTINGS
@given(case=crossed_cases())
def test_modes_after_a_gradient_solve_match_dense(case: Crossed) -> None:
    """The same after solve(θ, want_grad=True), as the optimiser leaves the objective at θ̂: computing the
    gradient must not disturb what the conditional modes are computed from."""
    check_against_dense(case, want_grad=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_threads_give_the_same_objective_and_gradient(name: str, reml: bool) -> None:
    """The level loops split over threads (private partial sums, row-split Schur update)."""
    model = multi_model(name)
    theta = model.theta_map.start() * 0.7 + 0.05
    one = model.objective(reml, n_threads=1).solve(theta, want_grad=True)
    two = model.objective(reml, n_threads=2).solve(theta, want_grad=True)
    assert two.objective == pytest.approx(one.objective, rel=1e-12)
    np.testing.assert_allclose(two.grad, one.grad, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(two.beta, one.beta, rtol=1e-11)
