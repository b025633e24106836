"""fit_many: every response equals a separate lmer fit on that response alone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast.datasets import load_sleepstudy
from lmefast.errors import InferenceError, SpecificationError


def crossed_data(n_donors: int = 30, n_batches: int = 4, m: int = 5, seed: int = 0
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Samples of donors measured in batches (crossed), and m responses with donor and batch
    effects of different sizes."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), n_batches)
    batch = np.tile(np.arange(n_batches), n_donors)
    n = donor.shape[0]
    data = pd.DataFrame({"donor": [f"d{d}" for d in donor], "batch": [f"b{b}" for b in batch],
                         "trait": rng.standard_normal(n), "age": rng.uniform(20, 80, n)})
    Y = np.empty((n, m))
    for j in range(m):
        sd_d, sd_b = rng.uniform(0.2, 2.0), rng.uniform(0.2, 2.0)
        Y[:, j] = (1.0 + 0.5 * j * data.trait + 0.01 * data.age + sd_d * rng.standard_normal(n_donors)[donor]
                   + sd_b * rng.standard_normal(n_batches)[batch] + rng.standard_normal(n))
    return data, pd.DataFrame(Y, columns=[f"gene{j}" for j in range(m)])


def sleep_responses(m: int = 5, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    ss = load_sleepstudy()
    rng = np.random.default_rng(seed)
    Y = ss.Reaction.to_numpy()[:, None] + 25 * rng.standard_normal((len(ss), m))
    return ss, pd.DataFrame(Y, columns=[f"r{j}" for j in range(m)])


def separate(formula_rhs: str, data: pd.DataFrame, y: pd.Series, reml: bool = True):
    d = data.copy()
    d["y"] = y.to_numpy()
    return lmefast.lmer(f"y ~ {formula_rhs}", d, reml=reml, missing="drop")


def assert_same_as_lmer(res: lmefast.ManyResults, name: str, ref) -> None:
    assert res.llf[name] == pytest.approx(ref.llf, rel=1e-8)
    ct = res.coef_table()
    rows = ct[ct.response == name].set_index("term")
    ref_ct = ref.coef_table()
    np.testing.assert_allclose(rows.estimate.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(rows.std_err.to_numpy(), ref.bse_fe.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(rows.df.to_numpy(), ref_ct.df.to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(rows.p.to_numpy(), ref_ct.p.to_numpy(), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(res.theta.loc[name].to_numpy(), ref.theta, rtol=1e-6, atol=1e-7)
    vc = res.varcorr()
    mine = vc[vc.response == name].drop(columns="response").reset_index(drop=True)
    theirs = ref.varcorr()
    assert list(mine.grp) == list(theirs.grp)
    np.testing.assert_allclose(mine.vcov.to_numpy(float), theirs.vcov.to_numpy(float), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reml", [True, False])
def test_one_factor_equals_lmer(reml: bool) -> None:
    data, Y = sleep_responses()
    rhs = "Days + (Days | Subject)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y, reml=reml)
    assert res.fitted.all() and res.converged.all()
    for name in Y.columns:
        assert_same_as_lmer(res, name, separate(rhs, data, Y[name], reml))


def test_several_factors_equal_lmer() -> None:
    data, Y = crossed_data()
    rhs = "trait + age + (1 | donor) + (1 | batch)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    for name in Y.columns:
        assert_same_as_lmer(res, name, separate(rhs, data, Y[name]))


def test_threads_across_responses_give_the_same_fits() -> None:
    data, Y = crossed_data(m=8, seed=3)
    rhs = "~ trait + (1 | donor) + (1 | batch)"
    one = lmefast.fit_many(rhs, data, Y, n_threads=1)
    two = lmefast.fit_many(rhs, data, Y, n_threads=2)
    np.testing.assert_allclose(two.llf.to_numpy(), one.llf.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(two.fe_params.to_numpy(), one.fe_params.to_numpy(), rtol=1e-8)


def test_missing_values_drop_rows_of_that_response_only() -> None:
    data, Y = crossed_data(m=4, seed=5)
    Y.iloc[[0, 5, 17], 1] = np.nan
    Y.iloc[[3], 2] = np.inf
    Y.iloc[[0, 5, 17], 3] = np.nan          # same pattern as response 1: one shared design
    rhs = "trait + (1 | donor) + (1 | batch)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    st = res.status()
    assert st.dropped_missing.tolist() == [0, 3, 1, 3]
    assert st.nobs.tolist() == [len(data), len(data) - 3, len(data) - 1, len(data) - 3]
    for name in Y.columns:
        ref = separate(rhs, data, Y[name].replace(np.inf, np.nan))
        assert ref.nobs == st.nobs[name]
        assert_same_as_lmer(res, name, ref)


def test_constant_and_missing_responses_are_reported_not_raised() -> None:
    data, Y = crossed_data(m=2)
    Y["flat"] = 3.0
    Y["empty"] = np.nan
    Y["one_left"] = np.nan
    Y.loc[0, "one_left"] = 1.0
    res = lmefast.fit_many("~ trait + (1 | donor) + (1 | batch)", data, Y)
    st = res.status()
    assert st.fitted.tolist() == [True, True, False, False, False]
    assert "constant" in st.reason["flat"]
    assert "missing" in st.reason["empty"]
    assert st.reason["one_left"] != ""
    assert set(res.coef_table().response) == {"gene0", "gene1"}
    assert np.isnan(res.llf["flat"])
    with pytest.raises(SpecificationError, match="not fitted"):
        res.result("flat")


def test_result_is_lmer_on_that_response() -> None:
    data, Y = sleep_responses(m=2)
    rhs = "Days + (Days | Subject)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    full = res.result("r1")
    ref = separate(rhs, data, Y["r1"])
    assert full.llf == pytest.approx(ref.llf, rel=1e-10)
    np.testing.assert_allclose(full.fe_params.to_numpy(), ref.fe_params.to_numpy(), rtol=1e-9)
    assert full.model.endog_name == "r1"


def test_t_test_for_all_responses() -> None:
    data, Y = crossed_data(m=3, seed=7)
    rhs = "trait + age + (1 | donor) + (1 | batch)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    tt = res.t_test("trait - 2*age = 0.5")
    assert len(tt) == 3
    for name in Y.columns:
        # results.t_test is statsmodels' (z tests unless ddf is given): ask for Satterthwaite
        ref = separate(rhs, data, Y[name]).t_test("trait - 2*age = 0.5", ddf="satterthwaite")
        row = tt[tt.response == name].iloc[0]
        assert row.estimate == pytest.approx(ref.effect[0], rel=1e-7)
        assert row.t == pytest.approx(ref.tvalue[0], rel=1e-6)
        assert row.df == pytest.approx(ref.df_denom[0], rel=1e-5)
        assert row.p == pytest.approx(ref.pvalue[0], rel=1e-5)


def test_residual_and_z_tables() -> None:
    data, Y = sleep_responses(m=2)
    res = lmefast.fit_many("~ Days + (Days | Subject)", data, Y, ddf="residual")
    assert (res.coef_table().df == len(data) - 2).all()
    assert "z" in res.coef_table(ddf=None).columns
    with pytest.raises(InferenceError, match="Satterthwaite"):
        res.coef_table(ddf="satterthwaite")


def test_arrays_and_bad_input() -> None:
    data, Y = sleep_responses(m=2)
    res = lmefast.fit_many("~ Days + (1 | Subject)", data, Y.to_numpy())
    assert res.names == ["y0", "y1"]
    with pytest.raises(SpecificationError, match="right-hand side"):
        lmefast.fit_many("Reaction ~ Days + (1 | Subject)", data, Y)
    with pytest.raises(SpecificationError, match="rows"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y.iloc[:10])
    with pytest.raises(InferenceError, match="Kenward-Roger"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y, ddf="kenward-roger")
    with pytest.raises(SpecificationError, match=r"\['label'\] are not numeric"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y.assign(label="a"))
    with pytest.raises(SpecificationError, match="duplicate"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, pd.concat([Y, Y], axis=1))


def test_weights_and_offset_equal_lmer() -> None:
    data, Y = crossed_data(m=3, seed=11)
    rng = np.random.default_rng(2)
    w = rng.uniform(0.3, 3.0, len(data))
    w[:2] = 0.0
    off = rng.normal(0, 0.5, len(data))
    Y.iloc[[4, 9], 1] = np.nan
    rhs = "trait + (1 | donor) + (1 | batch)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y, weights=w, offset=off)
    for name in Y.columns:
        d = data.assign(y=Y[name].to_numpy(), w=w, o=off)
        ref = lmefast.lmer(f"y ~ {rhs}", d, weights="w", offset="o", missing="drop")
        assert res.status().nobs[name] == ref.nobs
        assert_same_as_lmer(res, name, ref)
        assert res.result(name).llf == pytest.approx(ref.llf, rel=1e-10)


def test_designs_that_start_at_the_moment_estimates_equal_lmer() -> None:
    """A crossed design of 60 donors × 4 batches (64 blocks: the optimiser starts at the moment
    estimates, MultiObjective.moment_start_blocks) and one factor of 600 groups (above
    ProfiledObjective.moment_start_blocks): every response equals lmer on it, and the optimum
    equals the one reached from lme4's start."""
    rng = np.random.default_rng(11)
    donors, batches = 60, 4
    data = pd.DataFrame({"donor": np.repeat([f"d{i}" for i in range(donors)], batches),
                         "batch": np.tile([f"b{j}" for j in range(batches)], donors)})
    data["age"] = rng.normal(40, 10, len(data))
    b_d, b_b = rng.normal(0, 1, donors), rng.normal(0, 0.7, batches)
    Y = pd.DataFrame({f"g{k}": 0.02 * data["age"] + np.repeat(b_d, batches) * (k % 3)
                      + np.tile(b_b, donors) + rng.normal(0, 1, len(data)) for k in range(4)})
    res = lmefast.fit_many("~ age + (1 | donor) + (1 | batch)", data, Y)
    for name in Y.columns:
        model = lmefast.lmer_model(f"{name} ~ age + (1 | donor) + (1 | batch)", data.assign(**{name: Y[name]}))
        assert model.engine.objective(True).n_blocks >= model.engine.objective(True).moment_start_blocks
        assert_same_as_lmer(res, name, model.fit())
        from_lme4_start = model.fit(start_theta=1.001 * model.engine.theta_map.start())  # near lme4's
        assert from_lme4_start.llf == pytest.approx(res.llf[name], rel=1e-9)
    one = pd.DataFrame({"g": np.repeat(np.arange(600), 3), "x": rng.normal(size=1800)})
    Y1 = pd.DataFrame({f"h{k}": one["x"] + np.repeat(rng.normal(0, 1, 600), 3) + rng.normal(0, 1, 1800)
                       for k in range(2)})
    res1 = lmefast.fit_many("~ x + (1 | g)", one, Y1)
    for name in Y1.columns:
        ref = lmefast.lmer(f"{name} ~ x + (1 | g)", one.assign(**{name: Y1[name]}))
        assert_same_as_lmer(res1, name, ref)


def test_moment_starts_for_all_responses_at_once_equal_each_response_s_own() -> None:
    """Engine.moment_thetas (one linear system for the design, one right-hand side per
    response) gives each response the moment start its own objective computes, on two and three
    crossed scalar factors; fit_many then follows lmer's path from it (the same evaluations)."""
    rng = np.random.default_rng(5)
    n = 480
    data = pd.DataFrame({"a": rng.integers(0, 60, n), "b": rng.integers(0, 8, n), "c": rng.integers(0, 5, n),
                         "x": rng.normal(50, 10, n)})
    Y = np.column_stack([0.1 * data.x + rng.normal(0, 1 + j, 60)[data.a] + rng.normal(0, 0.5 * j, 8)[data.b]
                         + rng.normal(0, 0.3, 5)[data.c] + rng.normal(0, 1, n) for j in range(6)])
    for rhs in ("x + (1 | a) + (1 | b)", "x + (1 | a) + (1 | b) + (1 | c)"):
        assert _moment_starts_match(rhs, data, Y) >= 4


def _moment_starts_match(rhs: str, data: pd.DataFrame, Y: np.ndarray) -> int:
    """Engine.moment_thetas for the responses Y equal each response's own moment_theta (NaN
    where it has none), and fit_many follows lmer's path on each (the same evaluations, the
    same llf). Returns how many responses had a start."""
    eng = lmefast.lmer_model(f"y ~ {rhs}", data.assign(y=Y[:, 0])).engine
    X, Z = eng.response_design()
    zty, xty, yty = np.asarray(Z.T @ Y), X.T @ Y, np.einsum("ij,ij->j", Y, Y)
    starts = eng.moment_thetas(zty, xty, yty)
    assert starts.shape == (Y.shape[1], eng.theta_map.n_theta)
    template = eng.objective(True, 1)
    checked = 0
    for j in range(Y.shape[1]):
        own = template.respond(eng.with_response(zty[:, j], xty[:, j], yty[j])).moment_theta()
        if own is None:
            assert np.isnan(starts[j]).all()
        else:
            np.testing.assert_allclose(starts[j], own, rtol=1e-9, atol=1e-12)
            checked += 1
    res = lmefast.fit_many(f"~ {rhs}", data, Y)
    for j in range(Y.shape[1]):
        ref = lmefast.lmer_model(f"y ~ {rhs}", data.assign(y=Y[:, j])).fit()
        assert res.status().n_evals.iloc[j] == ref.optsummary.n_evals
        assert res.llf.iloc[j] == pytest.approx(ref.llf, rel=1e-9)
    return checked


def test_relative_scalars_is_relative_factor_of_a_diagonal() -> None:
    from lmefast.objective import relative_factor, relative_scalars
    psi = np.array([[2.0, -1.0, 0.0, 1e-5, -1.0, 3.0],
                    [0.5, 4.0, 0.0, 1.0, -2.0, 1.0]])
    sigma2 = np.array([1.5, 2.0, 1.0, 0.7, 1.0, -1.0])
    got = relative_scalars(psi, sigma2)
    for j in range(psi.shape[1]):
        want = relative_factor(np.diag(psi[:, j]), sigma2[j])
        if want is None:
            assert np.isnan(got[j]).all()
        else:
            np.testing.assert_allclose(got[j], np.sqrt(np.diag(want)), rtol=1e-14)


@pytest.mark.parametrize("rhs", ["x + (1 + x | g)", "x + (1 + x || g)", "x + (1 | g)"])
def test_one_factor_moment_starts_for_all_responses_at_once(rhs: str) -> None:
    """The one-factor engine's moment_thetas (one system for the design, a right-hand side per
    response; T the Cholesky factor of Ψ/σ², or √ of its diagonal) equal each response's own
    moment_theta; and a design of ≥ 500 groups fitted by fit_many takes lmer's path from them."""
    rng = np.random.default_rng(8)
    m_groups, per = 600, 3
    g = np.repeat(np.arange(m_groups), per)
    x = rng.normal(size=g.shape[0])
    data = pd.DataFrame({"g": g, "x": x})
    Y = np.column_stack([1 + 0.5 * x + rng.normal(0, 1 + 0.3 * j, m_groups)[g]
                         + rng.normal(0, 0.5, m_groups)[g] * x + rng.normal(size=g.shape[0]) for j in range(5)])
    assert _moment_starts_match(rhs, data, Y) == Y.shape[1]


def test_relative_factor_floors_the_eigenvalues() -> None:
    """Ψ/σ² = V diag(w) V' with its eigenvalues floored at 1e-2 × the largest; None without a
    positive σ² or eigenvalue (the batched relative_factors: NaN there)."""
    from lmefast.objective import MOMENT_FLOOR, relative_factor, relative_factors
    V, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    w = np.array([-1.0, 1e-5, 4.0])
    psi = V @ np.diag(w) @ V.T * 2.0
    rel = relative_factor(psi, 2.0)
    np.testing.assert_allclose(rel, V @ np.diag([4.0 * MOMENT_FLOOR, 4.0 * MOMENT_FLOOR, 4.0]) @ V.T,
                               atol=1e-13)
    assert relative_factor(psi, 0.0) is None and relative_factor(-psi - 10 * np.eye(3), 1.0) is None
    batch = relative_factors(np.stack([psi, psi, -np.eye(3)]), np.array([2.0, -1.0, 1.0]))
    np.testing.assert_allclose(batch[0], rel, rtol=1e-14)
    assert np.isnan(batch[1]).all() and np.isnan(batch[2]).all()
