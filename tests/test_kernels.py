"""The C kernels (cross-products, profiled objective, gradient, conditional modes) against a dense NumPy
implementation written here from first principles, on random small data sets (hypothesis).

Model: y = Xβ + Zb + ε, b ~ N(0, σ²ΛΛ'), ε ~ N(0, σ²I), Λ_i = blockdiag(T, diag(θ_vc)) per group, so
V = σ²V₀ with V₀ = I + ZΛΛ'Z'. Profiled over β and σ²:
    β̂ = (X'V₀⁻¹X)⁻¹X'V₀⁻¹y,  r = y − Xβ̂,  σ̂² = r'V₀⁻¹r / d  (d = n for ML, n − p for REML)
    ML:   −2ℓ = n log(2πσ̂²) + log|V₀| + n
    REML: −2ℓ_R = d log(2πσ̂²) + log|V₀| + log|X'V₀⁻¹X| + d.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lmefast
from lmefast import _crossprods
from lmefast.crossprods import compute_crossprods
from lmefast.datasets import load_penicillin, load_sleepstudy

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOG_2PI = np.log(2 * np.pi)


@dataclass
class Case:
    df: pd.DataFrame
    k: int
    p: int
    vc: bool
    theta: np.ndarray  # lower triangle of T by columns, then θ_vc (if vc)

    def model(self) -> lmefast.MixedLM:
        xs = [f"x{j}" for j in range(1, self.p)]
        zs = [f"z{j}" for j in range(1, self.k)]
        formula = "y ~ " + (" + ".join(xs) if xs else "1")
        re_formula = "~" + " + ".join(zs) if zs else "1"
        vc_formula = {"f": "0 + C(lev)"} if self.vc else None
        return lmefast.mixedlm(formula, self.df, groups="g", re_formula=re_formula, vc_formula=vc_formula)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    m = draw(st.integers(2, 6), label="m")
    sizes = draw(st.lists(st.integers(1, 8), min_size=m, max_size=m), label="sizes")
    k = draw(st.integers(1, 3), label="k")
    p = draw(st.integers(1, 3), label="p")
    vc = draw(st.booleans(), label="vc")
    n_levels = draw(st.integers(1, 3), label="levels") if vc else 0
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    labels = rng.permutation(np.repeat([f"G{c:02d}" for c in rng.permutation(m)], sizes))  # rows interleaved
    df = pd.DataFrame({"g": labels})
    for j in range(1, p):
        df[f"x{j}"] = rng.normal(size=n)
    for j in range(1, k):
        df[f"z{j}"] = rng.normal(size=n) + 0.5
    if vc:
        df["lev"] = rng.integers(0, n_levels, size=n)
    group_effect = {g: rng.normal(scale=2.0) for g in np.unique(labels)}
    df["y"] = rng.normal(size=n) + df["g"].map(group_effect).to_numpy() + 3.0
    n_re = k * m + (int(df.groupby("g")["lev"].nunique().sum()) if vc else 0)
    assume(n > n_re + p)
    nt = k * (k + 1) // 2
    diag = np.array([r == c for c in range(k) for r in range(c, k)])
    t_diag = draw(st.lists(st.floats(0.05, 2.0), min_size=nt, max_size=nt), label="theta_diag")
    t_off = draw(st.lists(st.floats(-1.0, 1.0), min_size=nt, max_size=nt), label="theta_off")
    theta = np.where(diag, t_diag, t_off)
    if vc:
        theta = np.append(theta, draw(st.floats(0.0, 2.0), label="theta_vc"))
    return Case(df, k, p, vc, theta)


# -- the dense reference ------------------------------------------------------------------------
def dense_Z(case: Case, model: lmefast.MixedLM) -> tuple[list[np.ndarray], list[list[str]]]:
    """Per group (in the model's group order): Z_i = [1, z1, ..] then one dummy column per level of
    `lev` present in the group (sorted), built from the data, and the expected coordinate names."""
    spec = model.spec
    Zs, names = [], []
    for gi, lab in enumerate(spec.group_labels.tolist()):
        rows = np.nonzero(case.df["g"].to_numpy() == lab)[0]
        assert np.array_equal(rows, np.nonzero(spec.group_codes == gi)[0])
        cols = [np.ones(rows.size)] + [case.df[f"z{j}"].to_numpy()[rows] for j in range(1, case.k)]
        nm = list(spec.theta_map.re_names)
        if case.vc:
            lev = case.df["lev"].to_numpy()[rows]
            for level in np.unique(lev):
                cols.append((lev == level).astype(float))
                nm.append(f"f[{level}]")
        Zs.append(np.column_stack(cols))
        names.append(nm)
    return Zs, names


def dense_lambda(case: Case, theta: np.ndarray, q: int) -> np.ndarray:
    """Λ_i for a group with q coordinates: T (θ's lower triangle filled column by column), then
    θ_vc on the diagonal of the variance-component coordinates."""
    k = case.k
    T = np.zeros((k, k))
    pos = 0
    for c in range(k):
        for r in range(c, k):
            T[r, c] = theta[pos]
            pos += 1
    L = np.zeros((q, q))
    L[:k, :k] = T
    if case.vc:
        L[k:, k:] = np.eye(q - k) * theta[pos]
    return L


@dataclass
class Dense:
    objective: float
    beta: np.ndarray
    sigma2: float
    b: list[np.ndarray]
    condvar: list[np.ndarray]


def dense_fit(case: Case, model: lmefast.MixedLM, theta: np.ndarray, reml: bool) -> Dense:
    spec = model.spec
    y, X = spec.y, spec.X
    n, p = X.shape
    Zs, _ = dense_Z(case, model)
    Z = np.zeros((n, sum(z.shape[1] for z in Zs)))
    lam = np.zeros((Z.shape[1], Z.shape[1]))
    off = 0
    for gi, Zi in enumerate(Zs):
        rows = np.nonzero(spec.group_codes == gi)[0]
        qi = Zi.shape[1]
        Z[rows, off:off + qi] = Zi
        lam[off:off + qi, off:off + qi] = dense_lambda(case, theta, qi)
        off += qi
    V0 = np.eye(n) + Z @ lam @ lam.T @ Z.T
    V0inv = np.linalg.inv(V0)
    XtVX = X.T @ V0inv @ X
    beta = np.linalg.solve(XtVX, X.T @ V0inv @ y)
    r = y - X @ beta
    d = n - p if reml else n
    sigma2 = float(r @ V0inv @ r) / d
    obj = d * (LOG_2PI + np.log(sigma2)) + np.linalg.slogdet(V0)[1] + d
    if reml:
        obj += np.linalg.slogdet(XtVX)[1]
    u = lam @ lam.T @ Z.T @ V0inv @ r
    b, cvs = [], []
    off = 0
    for Zi in Zs:
        qi = Zi.shape[1]
        b.append(u[off:off + qi])
        Li = lam[off:off + qi, off:off + qi]
        cvs.append(sigma2 * Li @ np.linalg.inv(Li.T @ Zi.T @ Zi @ Li + np.eye(qi)) @ Li.T)
        off += qi
    return Dense(float(obj), beta, sigma2, b, cvs)


# -- tests -------------------------------------------------------------------------------------
@SETTINGS
@given(case=cases())
def test_crossproducts_match_dense(case: Case) -> None:
    model = case.model()
    spec = model.spec
    np.testing.assert_array_equal(spec.y, case.df["y"].to_numpy())
    Zs, names = dense_Z(case, model)
    cp = model.crossprods
    p = spec.k_fe
    q_off = spec.layout.q_off
    assert cp.s_off.shape == (spec.n_groups + 1,)
    assert int(cp.s_off[-1]) == cp.S.size
    for gi, Zi in enumerate(Zs):
        rows = spec.group_codes == gi
        q = Zi.shape[1]
        assert int(q_off[gi + 1] - q_off[gi]) == q
        assert spec.coord_names(gi) == names[gi]
        np.testing.assert_allclose(spec.Zre[rows], Zi[:, :case.k], rtol=0, atol=0)
        rec = cp.S[cp.s_off[gi]:cp.s_off[gi + 1]]
        assert rec.size == q * q + q * p + q
        A = rec[:q * q].reshape(q, q)
        B = rec[q * q:q * q + q * p].reshape(q, p)
        c = rec[q * q + q * p:]
        Xi, yi = spec.X[rows], spec.y[rows]
        np.testing.assert_allclose(A, Zi.T @ Zi, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(B, Zi.T @ Xi, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(c, Zi.T @ yi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cp.XtX, spec.X.T @ spec.X, rtol=1e-12)
    np.testing.assert_allclose(cp.Xty, spec.X.T @ spec.y, rtol=1e-12)
    assert cp.yty == np.float64(spec.y @ spec.y) or abs(cp.yty - spec.y @ spec.y) <= 1e-12 * cp.yty
    assert cp.n == spec.nobs


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_accumulate_is_order_invariant(case: Case, seed: int) -> None:
    """The one pass adds rows in any order: a permutation of the rows gives the same records."""
    model = case.model()
    spec, lay, cp = model.spec, model.spec.layout, model.crossprods
    perm = np.random.default_rng(seed).permutation(spec.nobs)
    S = np.zeros_like(cp.S)
    _crossprods.accumulate(np.ascontiguousarray(spec.y[perm]), np.ascontiguousarray(spec.X[perm]),
                           np.ascontiguousarray(spec.Zre[perm]), np.ascontiguousarray(spec.group_codes[perm]),
                           lay.q_off, cp.s_off, np.ascontiguousarray(lay.vc_coord[:, perm]),
                           np.ascontiguousarray(lay.vc_val[:, perm]), S)
    np.testing.assert_allclose(S, cp.S, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=cases(), reml=st.booleans())
def test_objective_matches_dense(case: Case, reml: bool) -> None:
    model = case.model()
    sol = model.objective(reml).solve(case.theta)
    dense = dense_fit(case, model, case.theta, reml)
    assert abs(sol.objective - dense.objective) <= 1e-8 * max(1.0, abs(dense.objective))
    np.testing.assert_allclose(sol.beta, dense.beta, rtol=1e-7, atol=1e-9 * np.max(np.abs(dense.beta)))
    assert abs(sol.sigma2 - dense.sigma2) <= 1e-8 * dense.sigma2


@SETTINGS
@given(case=cases(), reml=st.booleans())
def test_gradient_matches_dense_finite_differences(case: Case, reml: bool) -> None:
    model = case.model()
    sol = model.objective(reml).solve(case.theta, want_grad=True)
    assert sol.grad is not None
    h = 1e-5
    fd = np.empty_like(case.theta)
    for i in range(case.theta.size):
        e = np.zeros_like(case.theta)
        e[i] = h
        up = dense_fit(case, model, case.theta + e, reml).objective
        down = dense_fit(case, model, case.theta - e, reml).objective
        fd[i] = (up - down) / (2 * h)
    scale = max(1.0, float(np.max(np.abs(fd))))
    np.testing.assert_allclose(sol.grad, fd, rtol=0, atol=1e-5 * scale)


@SETTINGS
@given(case=cases(), reml=st.booleans())
def test_modes_match_dense(case: Case, reml: bool) -> None:
    """b = ΛΛ'Z'V₀⁻¹(y − Xβ̂) per group, and the conditional covariance σ̂²Λ(Λ'Z'ZΛ + I)⁻¹Λ'."""
    model = case.model()
    obj = model.objective(reml)
    sol = obj.solve(case.theta)
    b, cv = obj.modes(sol)
    dense = dense_fit(case, model, case.theta, reml)
    lay = model.spec.layout
    for gi, (bd, cd) in enumerate(zip(dense.b, dense.condvar, strict=True)):
        q = bd.size
        bg = b[lay.q_off[gi]:lay.q_off[gi + 1]]
        cg = cv[lay.a_off[gi]:lay.a_off[gi + 1]].reshape(q, q)
        bscale = max(float(np.max(np.abs(np.concatenate(dense.b)))), 1e-8)
        np.testing.assert_allclose(bg, bd, rtol=0, atol=1e-8 * bscale)
        np.testing.assert_allclose(cg, cd, rtol=0, atol=1e-8 * max(float(np.max(np.abs(cd))), dense.sigma2))


@SETTINGS
@given(case=cases(), reml=st.booleans(), threads=st.integers(2, 4))
def test_threaded_kernels_match_single_thread(case: Case, reml: bool, threads: int) -> None:
    """The group loops split over threads give the records, objective, gradient and modes of one thread."""
    model = case.model()
    cp1 = compute_crossprods(model.spec, n_threads=1)
    cpt = compute_crossprods(model.spec, n_threads=threads)
    np.testing.assert_allclose(cpt.S, cp1.S, rtol=1e-14, atol=1e-14 * float(np.max(np.abs(cp1.S))))
    o1, ot = model.objective(reml, n_threads=1), model.objective(reml, n_threads=threads)
    s1, st_ = o1.solve(case.theta, want_grad=True), ot.solve(case.theta, want_grad=True)
    assert abs(st_.objective - s1.objective) <= 1e-12 * max(1.0, abs(s1.objective))
    gscale = max(1.0, float(np.max(np.abs(s1.grad))))
    np.testing.assert_allclose(st_.grad, s1.grad, rtol=1e-9, atol=1e-10 * gscale)
    np.testing.assert_allclose(st_.beta, s1.beta, rtol=1e-10, atol=1e-12)
    b1, c1 = o1.modes(s1)
    bt, ct = ot.modes(st_)
    np.testing.assert_allclose(bt, b1, rtol=1e-9, atol=1e-12 * max(1.0, float(np.max(np.abs(b1)))))
    np.testing.assert_allclose(ct, c1, rtol=1e-9, atol=1e-12 * max(1.0, float(np.max(np.abs(c1)))))


def _one_and_crossed(crossed_threads: int) -> tuple:
    """The objectives of sleepstudy's random slopes (one factor, one thread) and of Penicillin's
    crossed factors (the blocked kernel)."""
    data = Path(__file__).parent / "data"
    sleep = pd.read_csv(data / "sleepstudy.csv")
    penicillin = pd.read_csv(data / "Penicillin.csv")
    one = lmefast.mixedlm("Reaction ~ Days", sleep, groups="Subject", re_formula="~Days").objective(True, 1)
    crossed = lmefast.lmer_model("diameter ~ 1 + (1|plate) + (1|sample)", penicillin).objective(
        True, crossed_threads)
    return one, crossed


def test_both_kernels_share_one_python_face() -> None:
    """One wrapper layer (lmefast._kernel.Kernel) for the one-factor and the blocked kernel: the
    same checks of θ, the same results from evaluate and minimize, the same counters."""
    from lmefast._kernel import Kernel

    one, crossed = _one_and_crossed(crossed_threads=2)
    for obj in (one, crossed):
        kernel = obj.kernel
        assert isinstance(kernel, Kernel)
        nt = obj.theta_map.n_theta
        with pytest.raises(ValueError, match=f"{nt} entries"):
            kernel.evaluate(np.ones(nt + 1), True)
        with pytest.raises(ValueError, match=f"{nt} entries"):
            kernel.minimize(np.ones(nt), np.zeros(nt + 1))
        f, r2, logdet, status, beta, Lx, grad = kernel.evaluate(np.ones(nt), True)
        assert status == 0 and np.isfinite(f) and r2 > 0 and grad.shape == (nt,)
        assert beta.shape == (obj.cp.p,) and Lx.shape == (obj.cp.p, obj.cp.p)
        theta, fmin, g, f0, H, n_iter, code = kernel.minimize(np.ones(nt), np.zeros(nt), 1e-8, 200, None)
        assert f0 == pytest.approx(f, rel=1e-12) and fmin <= f
        # at the optimum, the objective is stationary along the free coordinates
        assert code in (0, 1, 2)
        free = theta > 1e-6
        assert np.all(np.abs(g[free]) < 1e-6 * abs(fmin))
        assert kernel.n_evals > n_iter
    assert one.kernel.n_threads == 1 and crossed.kernel.n_threads == 2


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (Days | Subject)",
                                     "diameter ~ 1 + (1 | plate) + (1 | sample)"])
def test_evaluate_points_is_evaluate_at_each_point(formula: str) -> None:
    """Kernel.evaluate_points (the finite-difference stencils of fit_many's Satterthwaite df)
    gives, row by row, what evaluate gives at that θ — one grouping factor and several."""
    data = load_sleepstudy() if "Days" in formula else load_penicillin()
    model = lmefast.lmer_model(formula, data)
    kernel = model.engine.objective(True, 1).kernel
    rng = np.random.default_rng(2)
    d = model.engine.theta_map.n_theta
    points = np.abs(rng.normal(1.0, 0.5, (5, d)))
    r2, logdet, status, Lx = kernel.evaluate_points(points)
    for k in range(points.shape[0]):
        _, r2_k, logdet_k, status_k, _, Lx_k, _ = kernel.evaluate(points[k], False)
        assert status[k] == status_k == 0
        assert r2[k] == pytest.approx(r2_k, rel=1e-13)
        assert logdet[k] == pytest.approx(logdet_k, rel=1e-13)
        np.testing.assert_allclose(Lx[k], Lx_k, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="columns"):
        kernel.evaluate_points(points[:, :1])


def test_minimize_gives_the_solution_at_its_result() -> None:
    """Kernel.minimize(at_theta=True) adds what evaluate gives at the θ it returns (the
    optimiser's final Solution needs no Python call of its own), for both kernels."""
    one, crossed = _one_and_crossed(crossed_threads=1)
    for obj in (one, crossed):
        nt = obj.theta_map.n_theta
        theta, fmin, g, _, _, _, code, at = obj.kernel.minimize(np.ones(nt), np.zeros(nt), 1e-9, 200,
                                                                None, True)
        f, r2, logdet, status, beta, Lx, _ = obj.kernel.evaluate(theta, False)
        assert at[0] == pytest.approx(fmin, rel=1e-14) and at[0] == pytest.approx(f, rel=1e-14)
        assert at[1] == pytest.approx(r2, rel=1e-14) and at[2] == pytest.approx(logdet, rel=1e-14)
        assert at[3] == status == 0
        np.testing.assert_allclose(at[4], beta, rtol=1e-13)
        np.testing.assert_allclose(at[5], Lx, rtol=1e-13)
        # the objective's minimize turns it into the Solution at θ, with the optimiser's gradient
        th, _, g2, _, _, _, _, sol = obj.minimize(np.ones(nt), np.zeros(nt), gtol=1e-9, maxiter=200,
                                                  on_iter=None)
        ref = obj.solve(th, want_grad=True)
        assert sol.objective == pytest.approx(ref.objective, rel=1e-14)
        np.testing.assert_allclose(sol.beta, ref.beta, rtol=1e-13)
        np.testing.assert_allclose(sol.grad, g2)
        assert sol.sigma2 == pytest.approx(ref.sigma2, rel=1e-14)


def test_respond_in_place_equals_a_new_objective() -> None:
    """KernelObjective.respond swaps the response parts of the kernel in place (one factor and
    several): the objective, gradient and β equal those of an objective built anew on the
    other response's cross-products, and a design of another size is refused."""
    data = Path(__file__).parent / "data"
    sleep = pd.read_csv(data / "sleepstudy.csv")
    penicillin = pd.read_csv(data / "Penicillin.csv")
    rng = np.random.default_rng(4)
    models = [lmefast.lmer_model("Reaction ~ Days + (Days | Subject)", sleep),
              lmefast.lmer_model("diameter ~ 1 + (1|plate) + (1|sample)", penicillin)]
    for model in models:
        eng = model.engine
        X, Z = eng.response_design()
        y2 = eng.response() + rng.normal(0, 2.0, eng.nobs)
        cp2 = eng.with_response(np.asarray(Z.T @ y2), X.T @ y2, float(y2 @ y2))
        obj = eng.objective(True, 1)
        theta = np.abs(rng.normal(1.0, 0.3, obj.theta_map.n_theta))
        before = obj.solve(theta, want_grad=True)
        fresh = eng.objective(True, 1, cp2).solve(theta, want_grad=True)
        swapped = obj.respond(cp2)
        assert swapped is obj                      # in place: the same objective and kernel
        got = swapped.solve(theta, want_grad=True)
        assert got.objective == pytest.approx(fresh.objective, rel=1e-13)
        assert got.objective != pytest.approx(before.objective, rel=1e-6)
        np.testing.assert_allclose(got.grad, fresh.grad, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.beta, fresh.beta, rtol=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        models[0].engine.objective(True, 1).kernel.set_response(np.zeros(3), np.zeros(2), 1.0)
    fewer = lmefast.lmer_model("diameter ~ 1 + (1|plate) + (1|sample)", penicillin[penicillin.plate != "a"])
    with pytest.raises(ValueError, match="differ in size"):
        models[1].engine.objective(True, 1).kernel.set_response(fewer.engine.crossprods)
