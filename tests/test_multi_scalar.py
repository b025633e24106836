"""The several-factor kernel's scalar path (every term a random intercept) against its general
path: both evaluate the same blocked Cholesky, so on the same cross-products they must give the
same objective, gradient, β̂, Lx, r², log|L|², conditional modes and variances (to rounding).
lmefast._multi.SCALAR_PATH = False builds kernels that take the general path."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import _multi
from lmefast.datasets import load_pastes, load_penicillin

RTOL = 1e-10


def crossed_expression(seed: int = 0) -> pd.DataFrame:
    """40 donors × 6 batches crossed, with prior weights."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(40), 6)
    batch = np.tile(np.arange(6), 40)
    n = donor.size
    y = (0.4 * rng.standard_normal(n) + rng.standard_normal(40)[donor]
         + 0.6 * rng.standard_normal(6)[batch] + rng.standard_normal(n))
    return pd.DataFrame({"y": y, "donor": donor.astype(str), "batch": batch.astype(str),
                         "trait": rng.standard_normal(n), "age": rng.uniform(20, 80, 40)[donor],
                         "w": rng.uniform(0.2, 3.0, n)})


def three_factors_unbalanced(seed: int = 1) -> pd.DataFrame:
    """Three partially crossed factors, unequal level sizes, some level pairs never met."""
    rng = np.random.default_rng(seed)
    n = 700
    g = rng.integers(0, 60, n) ** 2 // 60          # skewed: a few large levels, many small
    h = rng.integers(0, 9, n)
    j = (g + rng.integers(0, 3, n)) % 7
    x = rng.standard_normal(n)
    y = (1 + 0.5 * x + rng.standard_normal(60)[g] + 0.7 * rng.standard_normal(9)[h]
         + 0.3 * rng.standard_normal(7)[j] + rng.standard_normal(n))
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "h": h.astype(str),
                         "j": j.astype(str)})


CASES = {
    "crossed": (lambda: crossed_expression(), "y ~ trait + age + (1 | donor) + (1 | batch)", None),
    "crossed_weighted": (lambda: crossed_expression(), "y ~ trait + age + (1 | donor) + (1 | batch)",
                         "w"),
    "penicillin": (load_penicillin, "diameter ~ 1 + (1 | plate) + (1 | sample)", None),
    "nested": (load_pastes, "strength ~ 1 + (1 | batch/cask)", None),
    "three_factors": (lambda: three_factors_unbalanced(), "y ~ x + (1 | g) + (1 | h) + (1 | j)",
                      None),
}


def kernels(case: str, reml: bool, n_threads: int, monkeypatch: pytest.MonkeyPatch):
    make, formula, weights = CASES[case]
    model = lmefast.lmer_model(formula, make(), weights=weights)
    fast = model.engine.objective(reml, n_threads).kernel
    monkeypatch.setattr(_multi, "SCALAR_PATH", False)
    general = model.engine.objective(reml, n_threads).kernel
    return model, fast, general


def thetas(nt: int) -> list[np.ndarray]:
    rng = np.random.default_rng(nt)
    out = [np.full(nt, 0.7), rng.uniform(0.05, 2.5, nt), np.r_[0.0, rng.uniform(0.3, 1.5, nt - 1)]]
    return out + [np.r_[rng.uniform(0.3, 1.5, nt - 1), 0.0]]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scalar_path_equals_general_path(case: str, reml: bool, n_threads: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, fast, general = kernels(case, reml, n_threads, monkeypatch)
    assert fast.scalar_path and not general.scalar_path
    assert fast.n_threads == general.n_threads
    for theta in thetas(3 if case == "three_factors" else 2):
        for want_grad in (False, True):
            f1, r2_1, ld1, s1, b1, Lx1, g1 = fast.evaluate(theta, want_grad)
            f2, r2_2, ld2, s2, b2, Lx2, g2 = general.evaluate(theta, want_grad)
            assert s1 == s2 == 0
            np.testing.assert_allclose(ld1, ld2, rtol=RTOL, atol=RTOL)
            np.testing.assert_allclose(f1, f2, rtol=RTOL)
            np.testing.assert_allclose(r2_1, r2_2, rtol=RTOL)
            scale = np.abs(b2).max()
            np.testing.assert_allclose(b1, b2, rtol=RTOL, atol=RTOL * scale)
            np.testing.assert_allclose(Lx1, Lx2, rtol=RTOL, atol=RTOL * np.abs(Lx2).max())
            if want_grad:
                np.testing.assert_allclose(g1, g2, rtol=RTOL, atol=RTOL * np.abs(g2).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_scalar_path_modes_and_conditional_variances(case: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, fast, general = kernels(case, True, 1, monkeypatch)
    nt = 3 if case == "three_factors" else 2
    theta = np.linspace(0.4, 1.3, nt)
    for a, b in zip(fast.modes(theta), general.modes(theta), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())
    for a, b in zip(fast.conditional_variances(theta), general.conditional_variances(theta),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())


def test_scalar_path_fit_equals_general_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole fit (optimiser, β̂, σ², standard errors) on the two paths."""
    data = crossed_expression(3)
    formula = "y ~ trait + age + (1 | donor) + (1 | batch)"
    fast = lmefast.lmer(formula, data, weights="w")
    monkeypatch.setattr(_multi, "SCALAR_PATH", False)
    general = lmefast.lmer(formula, data, weights="w")
    np.testing.assert_allclose(fast.llf, general.llf, rtol=1e-10)
    np.testing.assert_allclose(fast.fe_params, general.fe_params, rtol=1e-7)
    np.testing.assert_allclose(fast.bse_fe, general.bse_fe, rtol=1e-7)
    np.testing.assert_allclose(fast.theta, general.theta, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scalar_path_log_determinant_at_large_theta(case: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """log|L11|² is summed as logs of running products of 1 + t1²a (> 1e200: a log each), or
    one log per level beyond 1e100. At such θ the rest is ill-conditioned (X'X − Σ Rzx'Rzx
    loses most digits, or all) and differs between the paths by more than rounding: log|L|²,
    computed before it, is compared."""
    _, fast, general = kernels(case, True, 1, monkeypatch)
    nt = 3 if case == "three_factors" else 2
    for t1 in (300.0, 1e4, 1e52):
        theta = np.r_[t1, np.ones(nt - 1)]
        ld1 = fast.evaluate(theta)[2]
        ld2 = general.evaluate(theta)[2]
        assert ld2 > 10.0
        np.testing.assert_allclose(ld1, ld2, rtol=RTOL)


@pytest.mark.parametrize("formula", ["y ~ x + (1 + x | g) + (1 | h)", "y ~ x + (1 | g) + (1 + x | h)",
                                     "y ~ x + (1 + x || g) + (1 | h)"])
def test_scalar_path_not_taken_with_a_vector_term(formula: str) -> None:
    data = three_factors_unbalanced()
    kernel = lmefast.lmer_model(formula, data).engine.objective(True, 1).kernel
    assert not kernel.scalar_path


def test_scalar_layout_needs_sorted_pairs() -> None:
    ptr = np.array([0, 2, 4])
    voff = np.arange(4)
    ones = np.ones(2, dtype=np.int32)
    assert _multi._scalar_layout(1, ones, ptr, np.array([0, 3, 1, 2]), voff)
    assert not _multi._scalar_layout(1, ones, ptr, np.array([3, 0, 1, 2]), voff)
    assert not _multi._scalar_layout(1, ones, ptr, np.array([0, 3, 2, 2]), voff)
    assert not _multi._scalar_layout(2, ones, ptr, np.array([0, 3, 1, 2]), voff)
    assert not _multi._scalar_layout(1, np.array([1, 2], dtype=np.int32), ptr,
                                     np.array([0, 3, 1, 2]), voff)
    assert not _multi._scalar_layout(1, ones, ptr, np.array([0, 3, 1, 2]), np.array([0, 1, 3, 4]))
