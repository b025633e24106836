"""The several-factor kernel's collapsed scalar path (levels of the first factor summed once by
their size) against the level-by-level scalar path and the general path: the same objective,
gradient, β̂, Lx, r², log|L|² (to rounding), on the same cross-products and after a change of
response. lmefast._multi.COLLAPSED_PATH = False builds kernels that keep the level loop."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kernel_compare import assert_same_evaluation

import lmefast
from lmefast import _multi
from lmefast.datasets import load_penicillin

RTOL = 1e-10


def crossed(n_donors: int = 30, sizes: tuple[int, ...] = (6,), n_batches: int = 6,
            plates: int = 0, seed: int = 0) -> pd.DataFrame:
    """Donors crossed with batches (donor i has sizes[i % len(sizes)] samples, batches in turn);
    with ``plates``, a third crossed factor."""
    rng = np.random.default_rng(seed)
    donor = np.concatenate([np.full(sizes[i % len(sizes)], i) for i in range(n_donors)])
    n = donor.size
    batch = np.arange(n) % n_batches
    y = (rng.standard_normal(n_donors)[donor] + 0.6 * rng.standard_normal(n_batches)[batch]
         + rng.standard_normal(n))
    out = pd.DataFrame({"donor": donor.astype(str), "batch": batch.astype(str),
                        "trait": rng.standard_normal(n), "age": rng.uniform(20, 80, n_donors)[donor]})
    if plates:
        plate = rng.integers(0, plates, n)
        y = y + 0.4 * rng.standard_normal(plates)[plate]
        out["plate"] = plate.astype(str)
    out["y"] = y
    out["y2"] = 3.0 * rng.standard_normal(n) + 0.5 * rng.standard_normal(n_donors)[donor]
    return out


CASES = {
    "balanced": (lambda: crossed(), "y ~ trait + age + (1 | donor) + (1 | batch)"),
    "three_sizes": (lambda: crossed(45, (4, 6, 9)), "y ~ trait + age + (1 | donor) + (1 | batch)"),
    "three_factors": (lambda: crossed(40, (5, 7), plates=4),
                      "y ~ trait + (1 | donor) + (1 | batch) + (1 | plate)"),
    "intercept_only": (lambda: crossed(25, (8,)), "y ~ 1 + (1 | donor) + (1 | batch)"),
    "penicillin": (load_penicillin, "diameter ~ 1 + (1 | plate) + (1 | sample)"),
}


@pytest.fixture(autouse=True)
def collapse_small_designs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test designs are small: collapse them wherever the sums cost less."""
    monkeypatch.setattr(_multi, "COLLAPSE_MIN_WORK", 0.0)


def kernels(case: str, reml: bool, monkeypatch: pytest.MonkeyPatch):
    make, formula = CASES[case]
    model = lmefast.lmer_model(formula, make())
    collapsed = model.engine.objective(reml, 1).kernel
    monkeypatch.setattr(_multi, "COLLAPSED_PATH", False)
    levels = model.engine.objective(reml, 1).kernel
    monkeypatch.setattr(_multi, "SCALAR_PATH", False)
    general = model.engine.objective(reml, 1).kernel
    return model, collapsed, levels, general


def thetas(nt: int) -> list[np.ndarray]:
    rng = np.random.default_rng(nt)
    return [np.full(nt, 0.7), rng.uniform(0.05, 2.5, nt), np.r_[0.0, rng.uniform(0.3, 1.5, nt - 1)],
            np.r_[rng.uniform(0.3, 1.5, nt - 1), 0.0], np.r_[40.0, rng.uniform(0.3, 1.5, nt - 1)]]


def assert_same(got: tuple, want: tuple) -> None:
    g1, g2 = assert_same_evaluation(got, want, RTOL)
    assert (g1 is None) == (g2 is None)
    if g2 is not None:
        np.testing.assert_allclose(g1, g2, rtol=1e-8, atol=1e-8 * max(1.0, np.abs(g2).max()))


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_collapsed_path_equals_level_paths(case: str, reml: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, collapsed, levels, general = kernels(case, reml, monkeypatch)
    assert collapsed.collapsed_path and collapsed.scalar_path
    assert not levels.collapsed_path and levels.scalar_path
    assert not general.collapsed_path and not general.scalar_path
    for theta in thetas(model.engine.theta_map.n_theta):
        for want_grad in (False, True):
            got = collapsed.evaluate(theta, want_grad)
            assert_same(got, levels.evaluate(theta, want_grad))
            assert_same(got, general.evaluate(theta, want_grad))


def test_collapsed_gradient_after_value_at_the_same_theta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimiser asks for the value, then the gradient at the same θ (reusing the sums);
    modes and conditional variances in between evaluate the levels themselves."""
    _, collapsed, levels, _ = kernels("three_sizes", True, monkeypatch)
    theta = np.array([0.8, 0.5])
    want = levels.evaluate(theta, True)
    collapsed.evaluate(theta, False)
    assert_same(collapsed.evaluate(theta, True), want)
    collapsed.evaluate(theta, False)
    for a, b in zip(collapsed.modes(theta), levels.modes(theta), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())
    for a, b in zip(collapsed.conditional_variances(theta), levels.conditional_variances(theta),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())
    assert_same(collapsed.evaluate(theta, True), want)


@pytest.mark.parametrize("case", ["balanced", "three_sizes", "three_factors"])
def test_collapsed_path_after_a_change_of_response(case: str) -> None:
    """set_response (fit_many's per-response swap) rebuilds the sums' response row: the kernel
    then equals one built on the other response."""
    make, formula = CASES[case]
    data = make()
    first = lmefast.lmer_model(formula, data).engine.objective(True, 1)
    other = lmefast.lmer_model(formula.replace("y ~", "y2 ~", 1), data).engine.objective(True, 1)
    assert first.kernel.collapsed_path and other.kernel.collapsed_path
    swapped = first.respond(other.cp)
    for theta in thetas(first.theta_map.n_theta):
        assert_same(swapped.kernel.evaluate(theta, True), other.kernel.evaluate(theta, True))


def test_collapsed_fit_equals_level_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    data = crossed(60, (4, 6, 9), seed=5)
    formula = "y ~ trait + age + (1 | donor) + (1 | batch)"
    fast = lmefast.lmer(formula, data)
    assert fast.model.engine.objective(True, 1).kernel.collapsed_path
    monkeypatch.setattr(_multi, "COLLAPSED_PATH", False)
    slow = lmefast.lmer(formula, data)
    np.testing.assert_allclose(fast.llf, slow.llf, rtol=1e-10)
    np.testing.assert_allclose(fast.fe_params, slow.fe_params, rtol=1e-7)
    np.testing.assert_allclose(fast.bse_fe, slow.bse_fe, rtol=1e-7)
    np.testing.assert_allclose(fast.theta, slow.theta, rtol=1e-6)


def test_collapsed_path_only_where_it_pays() -> None:
    """Sizes all distinct (prior weights) or a trailing block as large as the levels' work:
    the level loop is kept."""
    data = crossed(40, (5, 7))
    data["w"] = np.random.default_rng(2).uniform(0.5, 2.0, len(data))
    formula = "y ~ trait + (1 | donor) + (1 | batch)"
    assert lmefast.lmer_model(formula, data).engine.objective(True, 1).kernel.collapsed_path
    weighted = lmefast.lmer_model(formula, data, weights="w").engine.objective(True, 1).kernel
    assert weighted.scalar_path and not weighted.collapsed_path
    few = crossed(4, (3,), n_batches=3)
    small = lmefast.lmer_model(formula, few).engine.objective(True, 1).kernel
    assert small.scalar_path and not small.collapsed_path


def test_collapsed_path_not_taken_for_a_small_level_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default COLLAPSE_MIN_WORK, Penicillin's 24 plates keep the level loop (too cheap
    for the setup to pay); the balanced 100-donor design collapses."""
    monkeypatch.undo()              # the module's own threshold
    assert _multi.COLLAPSE_MIN_WORK > 0
    kernel = lmefast.lmer_model(CASES["penicillin"][1], load_penicillin()).engine.objective(True, 1).kernel
    assert kernel.scalar_path and not kernel.collapsed_path
    big = lmefast.lmer_model("y ~ trait + age + (1 | donor) + (1 | batch)", crossed(100))
    assert big.engine.objective(True, 1).kernel.collapsed_path


def test_fit_many_on_a_collapsed_design_equals_lmer() -> None:
    """fit_many's per-response swap (set_response) on a design that collapses: every response,
    with its Satterthwaite df, equals lmer on that response alone."""
    data = crossed(100, (6,), seed=7)
    rng = np.random.default_rng(8)
    n = len(data)
    donor = data.donor.astype(int).to_numpy()
    Y = pd.DataFrame({f"g{k}": 0.3 * k * data.trait + rng.uniform(0.1, 1.5) * rng.standard_normal(100)[donor]
                      + rng.standard_normal(n) for k in range(4)})
    rhs = "trait + age + (1 | donor) + (1 | batch)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    table = res.coef_table()
    for name in Y.columns:
        model = lmefast.lmer_model(f"{name} ~ {rhs}", data.assign(**{name: Y[name]}))
        assert model.engine.objective(True, 1).kernel.collapsed_path
        ref = model.fit()
        ref_ct = ref.coef_table()
        rows = table[table.response == name]
        assert res.llf[name] == pytest.approx(ref.llf, rel=1e-8)
        np.testing.assert_allclose(rows.estimate.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(rows.std_err.to_numpy(), ref.bse_fe.to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(rows.df.to_numpy(), ref_ct.df.to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(res.theta.loc[name].to_numpy(), ref.theta, rtol=1e-6, atol=1e-7)
