"""One design, many responses (DESIGN.md §4): ``fit_many`` fits the same lme4 formula to every
column of a responses matrix (genes, taxa, voxels, simulated data sets).

Everything of the profiled objective but Z'y, X'y and y'y is a function of the design alone, so
the design, its checks and its cross-products are built once; the response parts of all
responses are one sparse-times-dense product over the rows,

    Z'Y (q × m),   X'Y (p × m),   diag(Y'Y) (m),

and each response's θ is then optimised by the same kernels on the shared cross-products with
its response parts replaced (``Engine.with_response``). Nothing per response touches the rows.

A response with missing values is fitted on its own rows: responses with the same missing
pattern share one design (built again from those rows, as ``lmer`` would on them). A constant
or all-missing response, or one whose rows no longer identify the model, is reported as not
fitted with the reason, never raised.

Satterthwaite's df (lmerTest's, as ``lmefast.inference``) use lmerTest's deviance in
varpar = (θ, σ) with β profiled out,

    d(θ, σ) = a(θ) + r²(θ)/σ² + c log(2πσ²),   a = log|L|² (+ log|Rx|² for REML),
    c = n − p (REML) or n (ML),

whose σ-derivatives are analytic (∂²d/∂σ² = 6r²/σ⁴ − 2c/σ², ∂²d/∂θ∂σ = −2 ∂r²/∂θ / σ³); the
θ-derivatives of a + r²/σ̂² and of vcov(β̂) = σ²(Rx Rx')⁻¹ are central differences with
Richardson extrapolation at lmerTest's steps, from one set of solves per response.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lmefast.api import lmer_model
from lmefast.checks import check_rowwise
from lmefast.dask import _default_client, _shared, is_dask_dataframe
from lmefast.errors import InferenceError, ObjectiveError, SpecificationError
from lmefast.formula import as_dataframe
from lmefast.inference import normalize_ddf, parse_contrast
from lmefast.model import MixedLM, as_matrix, prior_weights_and_offset
from lmefast.optimize import fit_theta, significant
from lmefast.parallel import check_threads, get_num_threads
from lmefast.progress import progress_function
from lmefast.results import MixedLMResults

PLACEHOLDER = "__lmefast_response__"
_DEFAULT = object()       # ddf of the tables: fit_many's unless given
BLOCK = 512           # responses whose Z'y, X'y, y'y are formed together
#: threads across responses by default only for designs with this many levels (of the largest
#: factor): below, a response's kernel work (which runs without the GIL) is short against its
#: Python work, and threads contend for the GIL (sleepstudy's 18 subjects: 2 threads take 2.2×
#: the time of one; 100 donors × 6 batches crossed: 0.8× with the general several-factor
#: kernel, 0.93–1.1× since its scalar path made a response's kernel work ~4× shorter; 400
#: donors: 0.73×, 1,500: 0.64× — bench/RESULTS.md)
THREADS_MIN_LEVELS = 250


def _right_hand_side(formula: str) -> str:
    if not isinstance(formula, str) or "~" not in formula:
        raise SpecificationError(f"formula {formula!r} must be a right-hand side like "
                                 "'~ x + (1 | g)'")
    lhs, rhs = formula.split("~", 1)
    if lhs.strip():
        raise SpecificationError(f"fit_many takes the right-hand side only ('~ {rhs.strip()}'): the "
                                 f"responses come from the responses argument, not {lhs.strip()!r}")
    return rhs.strip()


def _response_matrix(responses: Any, n: int) -> tuple[np.ndarray, list[str]]:
    """The responses as an n × m matrix (column order: one response a column) and their names
    (a DataFrame's columns, a Series' name, else y0, y1, ...; duplicates raise)."""
    Y = as_matrix(responses, "responses", n, rows_of="data", order="F")
    if isinstance(responses, pd.DataFrame):
        names = [str(c) for c in responses.columns]
    elif isinstance(responses, pd.Series) and responses.name is not None:
        names = [str(responses.name)]
    else:
        names = [f"y{j}" for j in range(Y.shape[1])]
    if len(set(names)) != len(names):
        raise SpecificationError("responses have duplicate column names")
    return Y, names

def per_response_weights(weights: Any, n: int, names: list[str]) -> np.ndarray | None:
    """An n × m matrix of prior weights, one column per response (a DataFrame's columns are
    matched to the responses by name), or None when ``weights`` is not two-dimensional (one
    vector shared by all responses). Negative or non-finite weights raise."""
    if isinstance(weights, pd.DataFrame):
        cols = [str(c) for c in weights.columns]
        if set(cols) == set(names):
            weights = weights.set_axis(cols, axis=1)[names]
        elif cols != [str(j) for j in range(len(cols))]:
            raise SpecificationError("weights: the columns of a DataFrame of per-response weights "
                                     f"must be the responses' names ({names[:5]}...)")
    elif weights is None or np.ndim(weights) != 2:
        return None
    try:
        W = np.asarray(weights, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecificationError(f"weights are not numeric: {exc}") from None
    if W.shape != (n, len(names)):
        raise SpecificationError(f"per-response weights must be n × m = {n} × {len(names)} "
                                 f"(rows of data × responses), got {W.shape}")
    check_rowwise(W, "weights")
    return np.asfortranarray(W)


@dataclass
class _Design:
    """One row set (all rows, or the rows where a group of responses is observed) and the
    model of the formula on it."""

    rows: np.ndarray | None          # None: all rows
    model: MixedLM | None
    error: str = ""


def _theta_names(model: MixedLM) -> list[str]:
    out = []
    for c, (rows, cols) in zip(model.engine.covariance_terms(), model.theta_map.patterns, strict=True):
        for r, s in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = c.coef_names[r], c.coef_names[s]
            out.append(f"{c.factor} {a}" if r == s else f"{c.factor} {b}.{a}")
    return out


# -- one response ---------------------------------------------------------------------------------
@functools.cache
def _stencil(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The points of the central differences (in units of the steps h): the centre, ±e_i, then
    for i > j the four (±e_i ±e_j); and, for the points of both step sizes (the second set
    after the first), the index of +e_i (2 × d; −e_i follows it), of the first of each pair's
    four points (2 × pairs), and the pairs' i and j."""
    pts = [np.zeros(d)]
    for i in range(d):
        for sgn in (1.0, -1.0):
            e = np.zeros(d)
            e[i] = sgn
            pts.append(e)
    pairs = [(i, j) for i in range(d) for j in range(i)]
    for i, j in pairs:
        for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            e = np.zeros(d)
            e[i], e[j] = si, sj
            pts.append(e)
    K = len(pts) - 1
    first = np.array([0, K])[:, None]
    plus = first + 1 + 2 * np.arange(d)
    quad = first + 1 + 2 * d + 4 * np.arange(len(pairs))
    pi = np.array([i for i, _ in pairs], dtype=int)
    pj = np.array([j for _, j in pairs], dtype=int)
    out = (np.array(pts), plus, quad, pi, pj)
    for a in out:
        a.flags.writeable = False
    return out


def stencil_values(obj: Any, sol: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel at every point of the Satterthwaite stencil around the solution's θ (the
    centre is the solution's own values; module docstring), for two step sizes h and h/2:
    (r², log|L|², Lx) per point (2K + 1, 2K + 1, (2K + 1) × p × p)."""
    theta = sol.theta
    points = theta + _stencil_offsets(theta.shape[0]) * _steps(theta)
    r2, logdet, status, Lx = obj.kernel.evaluate_points(points)
    if status.any():
        obj.solve(points[np.argmax(status != 0)])    # raises the ObjectiveError that names it
    return (np.concatenate([[sol.r2], r2]), np.concatenate([[sol.logdet_L], logdet]),
            np.concatenate([sol.Lx[None], Lx]))


@functools.cache
def _stencil_offsets(d: int) -> np.ndarray:
    """The stencil's points besides the centre, for both step sizes, in units of h (read-only)."""
    unit = _stencil(d)[0][1:]
    out = np.concatenate([unit, 0.5 * unit])
    out.flags.writeable = False
    return out


def _steps(theta: np.ndarray) -> np.ndarray:
    return 1e-2 * np.maximum(np.abs(theta), 0.05)


def satterthwaite_batch(theta: np.ndarray, sigma2: np.ndarray, dof: np.ndarray, reml: bool,
                        r2: np.ndarray, logdet: np.ndarray, Lx: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(A, J) of lmerTest's Satterthwaite df for R solutions at once (module docstring):
    A = 2 H⁻¹ over varpar = (θ, σ) (R × (d + 1) × (d + 1)), J = ∂ vcov(β̂)/∂varpar
    (R × p × p × (d + 1)), from each solution's θ (R × d), σ² (R), degrees of freedom of σ̂²
    (R: n − p for REML, n for ML) and its ``stencil_values``
    (R × (2K + 1), R × (2K + 1), R × (2K + 1) × p × p). The differences of both step sizes
    are formed at once, then combined by Richardson's extrapolation (4 D(h/2) − D(h)) / 3."""
    R, d = theta.shape
    p = Lx.shape[-1]
    _, plus, quad, pi, pj = _stencil(d)
    sigma = np.sqrt(sigma2)
    if p:
        if reml:
            logdet = logdet + 2.0 * np.log(np.einsum("rkii->rki", Lx)).sum(axis=2)
        Linv = np.linalg.inv(Lx)
        C = np.einsum("rkji,rkjl->rkil", Linv, Linv)
    else:
        C = np.zeros(Lx.shape)
    g = logdet + r2 / sigma2[:, None]
    h = _steps(theta)
    hh = np.stack([h, 0.5 * h], axis=1)          # R × 2 (step sizes) × d
    Hg = np.zeros((R, 2, d, d))
    ar = np.arange(d)
    Hg[:, :, ar, ar] = (g[:, plus] - 2 * g[:, :1, None] + g[:, plus + 1]) / hh ** 2
    mixed = ((g[:, quad] - g[:, quad + 1] - g[:, quad + 2] + g[:, quad + 3])
             / (4 * hh[:, :, pi] * hh[:, :, pj]))
    Hg[:, :, pi, pj] = mixed
    Hg[:, :, pj, pi] = mixed
    dr = (r2[:, plus] - r2[:, plus + 1]) / (2 * hh)
    dC = (C[:, plus] - C[:, plus + 1]) / (2 * hh)[..., None, None]     # R × 2 × d × p × p
    Hg = (4 * Hg[:, 1] - Hg[:, 0]) / 3
    dr = (4 * dr[:, 1] - dr[:, 0]) / 3
    dC = (4 * dC[:, 1] - dC[:, 0]) / 3
    H = np.empty((R, d + 1, d + 1))
    H[:, :d, :d] = 0.5 * (Hg + np.swapaxes(Hg, 1, 2))
    H[:, :d, d] = H[:, d, :d] = -2.0 * dr / sigma[:, None] ** 3
    H[:, d, d] = 6.0 * r2[:, 0] / sigma ** 4 - 2.0 * dof / sigma2
    try:
        A = 2.0 * np.linalg.inv(H)
    except np.linalg.LinAlgError:      # one by one, pinv where a Hessian is singular
        A = np.empty_like(H)
        for r in range(R):
            try:
                A[r] = 2.0 * np.linalg.inv(H[r])
            except np.linalg.LinAlgError:
                A[r] = 2.0 * np.linalg.pinv(H[r])
    J = np.empty((R, p, p, d + 1))
    J[..., :d] = sigma2[:, None, None, None] * np.moveaxis(dC, 1, -1)
    J[..., d] = 2.0 * sigma[:, None, None] * C[:, 0]
    return A, J


@dataclass
class _Out:
    """Per-response results, preallocated for all m responses (O(m·(p² d + θ)) in all)."""

    theta: np.ndarray
    beta: np.ndarray
    cov: np.ndarray
    A: np.ndarray
    J: np.ndarray
    llf: np.ndarray
    sigma2: np.ndarray
    nobs: np.ndarray
    converged: np.ndarray
    singular: np.ndarray
    n_evals: np.ndarray
    reason: np.ndarray
    n_zero_weight: np.ndarray       # observed rows dropped for a zero per-response weight

    @classmethod
    def empty(cls, m: int, p: int, d: int) -> _Out:
        nan = np.nan
        return cls(theta=np.full((m, d), nan), beta=np.full((m, p), nan),
                   cov=np.full((m, p, p), nan), A=np.full((m, d + 1, d + 1), nan),
                   J=np.full((m, p, p, d + 1), nan), llf=np.full(m, nan), sigma2=np.full(m, nan),
                   nobs=np.zeros(m, dtype=np.int64), converged=np.zeros(m, dtype=bool),
                   singular=np.zeros(m, dtype=bool), n_evals=np.zeros(m, dtype=np.int64),
                   reason=np.full(m, "", dtype=object), n_zero_weight=np.zeros(m, dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: list[_Out]) -> _Out:
        """The responses of several parts, in order."""
        return cls(**{f: np.concatenate([getattr(o, f) for o in parts])
                      for f in cls.__dataclass_fields__})


def _fit_block(design: _Design, Yb: np.ndarray, Wb: np.ndarray | None, idx: np.ndarray, out: _Out,
               reml: bool, satterthwaite: bool, beta_pos: np.ndarray, theta_pos: np.ndarray,
               n_threads: int) -> None:
    """Fit the responses Yb (rows of the design × len(idx)) and write them at idx of out.
    Wb: per-response prior weights of those rows (the design's rows then carry none, and each
    response's cross-products are one weighted pass over the design's rows, made in turn)."""
    model = design.model
    engine = model.engine
    starts = None                 # the responses' moment starts, where the engine gives them
    if Wb is None:
        X, Z = engine.response_design()
        ZtY = np.asarray(Z.T @ Yb)
        XtY = X.T @ Yb
        yty = np.einsum("ij,ij->j", Yb, Yb)
        starts = engine.moment_thetas(ZtY, XtY, yty)     # all responses at once
        if starts is not None:          # rounded as the optimiser rounds one (all at once)
            known = np.all(np.isfinite(starts), axis=1)
            starts = [s if k else None
                      for s, k in zip(significant(np.where(known[:, None], starts, 0.0)), known,
                                      strict=True)]
    tm = engine.theta_map
    start = tm.start()
    kept = beta_pos >= 0
    sc = engine.scaling
    reml_offset = sc.reml_offset() if reml else 0.0
    identity = sc.is_identity

    bp, tp = beta_pos[kept], theta_pos
    tv = np.append(tp, -1)
    n, pk, d = len(idx), bp.shape[0], tp.shape[0]
    # per response on the engine's scale, mapped to the user's after the loop, all at once
    theta_e, beta_e = np.full((n, d), np.nan), np.full((n, pk), np.nan)
    Lx_e = np.tile(np.eye(pk), (n, 1, 1))
    n_st = _stencil(d)[0].shape[0] * 2 - 1 if satterthwaite else 0     # stencil points
    st_r2, st_logdet, st_Lx = np.empty((n, n_st)), np.empty((n, n_st)), np.empty((n, n_st, pk, pk))
    dof = np.zeros(n)
    ok = np.zeros(n, dtype=bool)

    def work(cols: range) -> None:
        template = engine.objective(reml, 1)
        for i in cols:
            j = idx[i]
            try:
                if Wb is None:        # only the response parts differ from the template's
                    obj = template.respond(engine.with_response(ZtY[:, i], XtY[:, i], yty[i]),
                                           None if starts is None else starts[i])
                else:
                    obj = engine.objective(reml, 1, engine.weighted_crossprods(Yb[:, i], Wb[:, i]))
                sol, opt = fit_theta(obj, start)
                if satterthwaite:
                    st_r2[i], st_logdet[i], st_Lx[i] = stencil_values(obj, sol)
                    dof[i] = obj.dof
            except (ObjectiveError, FloatingPointError, np.linalg.LinAlgError) as exc:
                out.reason[j] = f"the fit failed: {exc}"
                continue
            ok[i] = True
            theta_e[i], beta_e[i], Lx_e[i] = sol.theta, sol.beta, sol.Lx
            out.llf[j] = -0.5 * (sol.objective + reml_offset)
            out.sigma2[j] = sol.sigma2
            out.nobs[j] = engine.nobs
            out.converged[j] = opt.converged
            out.singular[j] = opt.singular
            out.n_evals[j] = opt.n_evals

    nth = max(1, min(n_threads, n))
    if nth == 1:
        work(range(n))
    else:
        bounds = np.linspace(0, n, nth + 1).astype(int)
        with ThreadPoolExecutor(nth) as pool:
            list(pool.map(work, [range(bounds[t], bounds[t + 1]) for t in range(nth)]))
    # on the user's scale (lmefast.scaling): θ, β = Sβ̃, cov = S cov S'; the Satterthwaite
    # parts stay in the engine's θ (df do not depend on θ's coordinates) with the Jacobian of
    # cov(β) mapped as cov is
    rows, at = np.nonzero(ok)[0], idx[ok]
    if identity or sc.terms_identity:
        out.theta[np.ix_(at, tp)] = theta_e[rows]
    else:
        for i, j in zip(rows.tolist(), at.tolist(), strict=True):
            out.theta[j, tp] = sc.theta(tm, theta_e[i])
    out.beta[np.ix_(at, bp)] = beta_e[rows] if identity else sc.beta(beta_e[rows])
    if pk:
        Linv = np.linalg.inv(Lx_e[rows])
        cov = out.sigma2[at][:, None, None] * np.einsum("kji,kjl->kil", Linv, Linv)
        if not identity:
            cov = np.einsum("ab,kbc,dc->kad", sc.fixed, cov, sc.fixed)
        out.cov[np.ix_(at, bp, bp)] = cov
    if satterthwaite and rows.shape[0]:
        A, J = satterthwaite_batch(theta_e[rows], out.sigma2[at], dof[rows], reml, st_r2[rows],
                                   st_logdet[rows], st_Lx[rows])
        out.A[np.ix_(at, tv, tv)] = A
        J = J if identity else np.einsum("ab,kbcd,ec->kaed", sc.fixed, J, sc.fixed)
        out.J[np.ix_(at, bp, bp, tv)] = J


# -- the front door -------------------------------------------------------------------------------
def fit_many(formula: str, data: Any, responses: Any, *, reml: bool = True, weights: Any = None,
             offset: Any = None, ddf: str | None = "satterthwaite", n_threads: int | None = None,
             progress: Any = False) -> ManyResults:
    """Fit ``formula`` (a right-hand side in lme4's syntax, e.g. ``"~ trait + age + (1 | donor)
    + (1 | batch)"``) to every column of ``responses`` (an n × m DataFrame or array, rows in
    the order of ``data``).

    Each response gets its own θ, β, σ² and inference; every fitted response equals ``lmer`` on
    that response alone (``result(name)`` gives that fit in full). Missing values in a response
    drop that response's rows only; constant or all-missing responses are reported as not
    fitted (``status()``). ``weights``: lme4's prior weights (residual variance σ²/wᵢ), one
    vector shared by all responses (zero drops a row) or an n × m matrix, one column per
    response (voom's precision weights; a DataFrame's columns matched by name; zero drops that
    row for that response only); ``offset`` (one per row) is subtracted from every response.
    ``ddf``: 'satterthwaite' (lmerTest),
    'residual', or None (z tests).
    ``n_threads``: threads across responses (default lmefast.parallel.get_num_threads() for
    designs of at least THREADS_MIN_LEVELS levels, else 1).
    ``progress``: True prints, a callable(stage, done, total) receives reports.

    ``responses`` may be a Dask array or DataFrame (more responses than one machine holds): its
    blocks of columns are fitted on the workers (``fit_many_dask``)."""
    if type(responses).__module__.split(".")[0] == "dask":
        return fit_many_dask(formula, data, responses, reml=reml, weights=weights, offset=offset,
                             ddf=ddf, n_threads=n_threads, progress=progress)
    rhs = _right_hand_side(formula)
    df = as_dataframe(data)
    n = len(df)
    Y, names = _response_matrix(responses, n)
    m = Y.shape[1]
    ddf = normalize_ddf(ddf)
    if ddf == "kenward-roger":
        raise InferenceError("fit_many computes Satterthwaite, residual or z tests; for Kenward-Roger "
                             "take one response's fit: res.result(name).coef_table(ddf='kenward-roger')")
    W = per_response_weights(weights, n, names)
    w, off = prior_weights_and_offset(None if W is not None else weights, offset, n)
    if w is not None and not np.all(w > 0):       # zero weights: those rows are dropped
        keep = np.nonzero(w > 0)[0]
        df, Y, w = df.iloc[keep].reset_index(drop=True), np.asfortranarray(Y[keep]), w[keep]
        off = off[keep] if off is not None else None
        n = len(df)
    n_threads = None if n_threads is None else check_threads(n_threads)
    report = progress_function(progress)

    frame = df.copy(deep=False)
    frame[PLACEHOLDER] = np.arange(n, dtype=float)
    f = f"{PLACEHOLDER} ~ {rhs}"
    rowwise = {"weights": w, "offset": off}     # of the designs (per-response weights: none)

    def design_model(rows: np.ndarray | None) -> MixedLM:
        if rows is None:
            return lmer_model(f, frame, **rowwise)
        return lmer_model(f, frame.iloc[rows].reset_index(drop=True),
                          **{k: None if v is None else v[rows] for k, v in rowwise.items()})

    main = _Design(None, design_model(None))
    nth = n_threads if n_threads is not None else (
        get_num_threads() if main.model.engine.n_levels >= THREADS_MIN_LEVELS else 1)
    beta_names = main.model.exog_names
    theta_names = _theta_names(main.model)
    out = _Out.empty(m, len(beta_names), len(theta_names))

    finite = np.isfinite(Y)
    n_finite = finite.sum(axis=0)
    if W is not None:          # a zero weight drops that row of that response, as a missing value
        out.n_zero_weight[:] = np.sum(finite & (W == 0), axis=0)
        finite &= W > 0
    complete = finite.all(axis=0)
    n_obs = finite.sum(axis=0)
    spread = np.zeros(m)
    if complete.any():     # over every column (a masked copy of Y is ~35× slower), kept where complete
        with np.errstate(invalid="ignore"):         # ±inf in a column that is not complete
            spread[complete] = np.ptp(Y, axis=0)[complete]
    for j in np.nonzero(~complete & (n_obs > 0))[0]:
        spread[j] = np.ptp(Y[finite[:, j], j])
    all_missing = n_finite == 0
    all_zero_weight = ~all_missing & (n_obs == 0)
    constant = ~all_missing & ~all_zero_weight & ~(spread > 0)
    out.reason[all_missing] = "all values are missing"
    out.reason[all_zero_weight] = "every weight of its observed rows is zero"
    out.reason[constant] = "the response is constant: there is no variance to model"
    groups: dict[bytes, list[int]] = defaultdict(list)
    for j in np.nonzero(~(all_missing | all_zero_weight | constant))[0].tolist():
        groups[b"" if complete[j] else np.packbits(finite[:, j]).tobytes()].append(j)

    designs: dict[bytes, _Design] = {b"": main}
    for key, cols in groups.items():
        if key in designs:
            continue
        rows = np.nonzero(finite[:, cols[0]])[0]
        try:
            designs[key] = _Design(rows, design_model(rows))
        except SpecificationError as exc:
            designs[key] = _Design(rows, None, str(exc))

    total, done = sum(len(c) for c in groups.values()), 0
    for key, cols in groups.items():
        design = designs[key]
        cols_arr = np.asarray(cols, dtype=np.int64)
        if design.model is None:
            out.reason[cols_arr] = f"not fitted on its {len(design.rows)} observed rows: {design.error}"
            done += len(cols)
            continue
        beta_pos = np.array([beta_names.index(b) if b in beta_names else -1
                             for b in design.model.exog_names], dtype=np.int64)
        lost = [b for b in design.model.exog_names if b not in beta_names]
        if lost:
            out.reason[cols_arr] = f"its observed rows give fixed effects {lost} not in the full design"
            done += len(cols)
            continue
        theta_pos = np.array([theta_names.index(t) for t in _theta_names(design.model)], dtype=np.int64)
        for b0 in range(0, len(cols), BLOCK):
            idx = cols_arr[b0:b0 + BLOCK]
            Yb = Y[:, idx] if design.rows is None else Y[np.ix_(design.rows, idx)]
            rows = slice(None) if design.rows is None else design.rows
            if off is not None:        # the working response √w (y − o) of the weighted model
                Yb = Yb - off[rows, None]
            if w is not None:
                Yb = Yb * np.sqrt(w[rows])[:, None]
            Wb = None if W is None else W[np.ix_(np.arange(n)[rows], idx)]
            _fit_block(design, Yb, Wb, idx, out, reml, ddf == "satterthwaite", beta_pos, theta_pos, nth)
            done += len(idx)
            if report is not None:
                report("responses", done, total)
    return ManyResults(names, beta_names, theta_names, out, reml, ddf, n_finite, n, rhs, frame,
                       Y, rowwise, main.model, W)


# -- results --------------------------------------------------------------------------------------
class ManyResults:
    """The fits of ``fit_many``: one row per response in ``status()``, long tables over the
    fitted responses (``coef_table``, ``varcorr``, ``t_test``), and ``result(name)`` for one
    response's full results."""

    def __init__(self, names: list[str], beta_names: list[str], theta_names: list[str], out: _Out,
                 reml: bool, ddf: str | None, n_observed: np.ndarray, n_rows: int, rhs: str,
                 frame: pd.DataFrame, Y: np.ndarray, rowwise: dict, template: MixedLM,
                 weights: np.ndarray | None = None) -> None:
        self.names = list(names)
        self.exog_names = list(beta_names)
        self.theta_names = list(theta_names)
        self._out = out
        self.reml = reml
        self.ddf = ddf
        self._n_observed = n_observed
        self._n_rows = n_rows
        self._rhs = rhs
        self._frame = frame
        self._Y = Y
        self._rowwise = rowwise
        self._template = template
        self._W = weights
        self._index = {name: j for j, name in enumerate(self.names)}

    # -- per response ----------------------------------------------------------------------------
    @property
    def fitted(self) -> pd.Series:
        return pd.Series(self._out.reason == "", index=self.names, name="fitted")

    def _series(self, values: np.ndarray, name: str) -> pd.Series:
        return pd.Series(values.copy(), index=pd.Index(self.names, name="response"), name=name)

    @property
    def llf(self) -> pd.Series:
        """Log-likelihood per response (REML for REML fits; NaN where not fitted)."""
        return self._series(self._out.llf, "llf")

    @property
    def converged(self) -> pd.Series:
        return self._series(self._out.converged, "converged")

    @property
    def singular(self) -> pd.Series:
        return self._series(self._out.singular, "singular")

    @property
    def scale(self) -> pd.Series:
        """Residual variance σ̂² per response."""
        return self._series(self._out.sigma2, "scale")

    @property
    def theta(self) -> pd.DataFrame:
        """θ̂ per response (lme4's order; columns name the factor and coefficient)."""
        return pd.DataFrame(self._out.theta.copy(), index=pd.Index(self.names, name="response"),
                            columns=self.theta_names)

    @property
    def fe_params(self) -> pd.DataFrame:
        return pd.DataFrame(self._out.beta.copy(), index=pd.Index(self.names, name="response"),
                            columns=self.exog_names)

    def status(self) -> pd.DataFrame:
        """One row per response: fitted, the reason when not, observations used, rows dropped
        for missing values (and, with per-response weights, for zero weights), convergence,
        singularity, log-likelihood, evaluations of the objective."""
        o = self._out
        extra = {} if self._W is None else {"dropped_zero_weight": o.n_zero_weight}
        return pd.DataFrame({"fitted": o.reason == "", "reason": o.reason, "nobs": o.nobs,
                             "dropped_missing": self._n_rows - self._n_observed, **extra,
                             "converged": o.converged, "singular": o.singular, "llf": o.llf,
                             "n_evals": o.n_evals},
                            index=pd.Index(self.names, name="response"))

    # -- tables over all responses -----------------------------------------------------------------
    def _contrast_rows(self, L: np.ndarray, rhs: np.ndarray, labels: list[str], ddf: str | None
                       ) -> pd.DataFrame:
        o = self._out
        ok = np.nonzero(o.reason == "")[0]
        est = np.einsum("rp,mp->mr", L, o.beta[ok]) - rhs[None, :]
        var = np.einsum("rp,mpq,rq->mr", L, o.cov[ok], L)
        se = np.sqrt(var)
        if ddf == "satterthwaite":
            g = np.einsum("rp,mpqk,rq->mrk", L, o.J[ok], L)
            denom = np.einsum("mrk,mkl,mrl->mr", g, o.A[ok], g)
            with np.errstate(divide="ignore", invalid="ignore"):
                df = np.where(denom > 0, 2.0 * var * var / denom, np.inf)
        elif ddf == "residual":
            df = np.broadcast_to((o.nobs[ok] - len(self.exog_names))[:, None].astype(float), est.shape)
        else:
            df = np.full(est.shape, np.inf)
        t = est / se
        pval = 2 * (stats.norm.sf(np.abs(t)) if ddf is None else stats.t.sf(np.abs(t), df))
        r = L.shape[0]
        return pd.DataFrame({
            "response": np.repeat(np.asarray(self.names, dtype=object)[ok], r),
            "term": np.tile(np.asarray(labels, dtype=object), ok.shape[0]),
            "estimate": (est + rhs[None, :]).ravel(), "std_err": se.ravel(),
            "df": np.asarray(df, dtype=float).ravel(), "z" if ddf is None else "t": t.ravel(),
            "p": pval.ravel()})

    def _check_ddf(self, ddf: Any) -> str | None:
        ddf = self.ddf if ddf is _DEFAULT else normalize_ddf(ddf)
        if ddf == "satterthwaite" and self.ddf != "satterthwaite":
            raise InferenceError("Satterthwaite df were not computed: fit_many(..., ddf='satterthwaite')")
        if ddf == "kenward-roger":
            raise InferenceError("Kenward-Roger: use res.result(name).coef_table(ddf='kenward-roger')")
        return ddf

    def coef_table(self, ddf: Any = _DEFAULT) -> pd.DataFrame:
        """Long table of the fixed effects of every fitted response: response, term, estimate,
        std_err, df, t (z when ddf is None), p. ``ddf`` defaults to fit_many's."""
        ddf = self._check_ddf(ddf)
        p = len(self.exog_names)
        return self._contrast_rows(np.eye(p), np.zeros(p), self.exog_names, ddf)

    def t_test(self, contrast: str | Sequence | np.ndarray, ddf: Any = _DEFAULT) -> pd.DataFrame:
        """A contrast l'β = rhs ('trait = 0', 'a - b = 0', several separated by commas; or a
        matrix with one column per fixed effect) tested for every fitted response: response,
        term (the contrast), estimate (l'β̂), std_err, df, t, p."""
        ddf = self._check_ddf(ddf)
        if isinstance(contrast, str):
            L, rhs = parse_contrast(contrast, self.exog_names)
            labels = [s.strip() for s in contrast.replace(";", ",").split(",")]
        else:
            L = np.atleast_2d(np.asarray(contrast, dtype=float))
            if L.shape[1] != len(self.exog_names):
                raise InferenceError(f"contrast matrix must have {len(self.exog_names)} columns "
                                     f"({self.exog_names}), got shape {L.shape}")
            rhs = np.zeros(L.shape[0])
            labels = [f"c{i}" for i in range(L.shape[0])]
        return self._contrast_rows(L, rhs, labels, ddf)

    def varcorr(self) -> pd.DataFrame:
        """lme4's as.data.frame(VarCorr(fit)) for every fitted response, stacked: response,
        grp, var1, var2, vcov, sdcor."""
        o = self._out
        ok = np.nonzero(o.reason == "")[0]
        model = self._template
        s2 = o.sigma2[ok]
        parts = []
        offsets = model.theta_map.offsets
        resp = np.asarray(self.names, dtype=object)[ok]
        for j, (c, k, (rows, cols)) in enumerate(zip(model.engine.covariance_terms(), model.theta_map.ks,
                                                     model.theta_map.patterns, strict=True)):
            T = np.zeros((ok.shape[0], k, k))
            T[:, rows, cols] = o.theta[ok][:, offsets[j]:offsets[j + 1]]
            cov = s2[:, None, None] * np.einsum("mab,mcb->mac", T, T)
            sd = np.sqrt(np.einsum("maa->ma", cov))
            for a, name in enumerate(c.coef_names):
                parts.append((resp, c.factor, name, None, cov[:, a, a], sd[:, a]))
            for b in range(k):
                for a in range(b + 1, k):
                    if c.free[a, b]:
                        with np.errstate(invalid="ignore", divide="ignore"):
                            corr = cov[:, a, b] / (sd[:, a] * sd[:, b])
                        parts.append((resp, c.factor, c.coef_names[b], c.coef_names[a], cov[:, a, b], corr))
        parts.append((resp, "Residual", None, None, s2, np.sqrt(s2)))
        frames = [pd.DataFrame({"response": r, "grp": g, "var1": v1, "var2": v2, "vcov": v, "sdcor": s})
                  for r, g, v1, v2, v, s in parts]
        out = pd.concat(frames, ignore_index=True)
        order = np.argsort(np.concatenate([np.arange(ok.shape[0])] * len(parts)), kind="stable")
        return out.iloc[order].reset_index(drop=True)

    # -- one response in full ------------------------------------------------------------------------
    def model(self, name: str) -> MixedLM:
        """The model of one response (its observed rows), as ``lmer_model`` builds it."""
        if name not in self._index:
            raise KeyError(f"no response {name!r}")
        j = self._index[name]
        y = np.asarray(self._Y[:, j], dtype=float)      # a Dask array's column is computed
        rows = np.nonzero(np.isfinite(y))[0]
        frame = self._frame.iloc[rows].reset_index(drop=True).copy(deep=False)
        frame[PLACEHOLDER] = y[rows]
        rowwise = dict(self._rowwise)
        if self._W is not None:
            rowwise["weights"] = np.asarray(self._W[:, j], dtype=float)
        model = lmer_model(f"{PLACEHOLDER} ~ {self._rhs}", frame,
                           **{k: None if v is None else v[rows] for k, v in rowwise.items()})
        model.endog_name = str(name)
        return model

    def result(self, name: str) -> MixedLMResults:
        """The full results of one response: ``lmer`` on that response alone (its observed rows)."""
        j = self._index.get(name)
        if j is not None and self._out.reason[j]:
            raise SpecificationError(f"response {name!r} was not fitted: {self._out.reason[j]}")
        return self.model(name).fit(reml=self.reml)

    def __repr__(self) -> str:
        nf = int(np.sum(self._out.reason == ""))
        return (f"<ManyResults {'REML' if self.reml else 'ML'}: {nf} of {len(self.names)} responses "
                f"fitted, {int(self._out.converged.sum())} converged>")


# -- responses in Dask: blocks of columns on the workers ------------------------------------------
def _fit_columns(data: pd.DataFrame, formula: str, Y: np.ndarray, W: np.ndarray | None, reml: bool,
                 weights: Any, offset: Any, ddf: str | None, n_threads: int) -> tuple[Any, np.ndarray]:
    """fit_many on one block of columns (on a worker): the per-response results and counts."""
    res = fit_many(formula, data, np.asarray(Y, dtype=float), reml=reml,
                        weights=weights if W is None else np.asarray(W, dtype=float), offset=offset,
                        ddf=ddf, n_threads=n_threads)
    return res._out, res._n_observed


def fit_many_dask(formula: str, data: Any, responses: Any, *, reml: bool = True, weights: Any = None,
                  offset: Any = None, ddf: str | None = "satterthwaite", n_threads: int | None = None,
                  progress: Any = False, client: Any = None, block: int | None = None) -> ManyResults:
    """``lmefast.fit_many`` with the responses in a Dask array or DataFrame (n × m, rows in the
    order of ``data``, which is in memory): the responses are split by columns into blocks of
    ``block`` (default lmefast.many.BLOCK) with all rows, each block is fitted on a worker by
    the in-memory fit_many (``n_threads`` threads, default 1), and only the per-response results
    (O(m·k)) come back. ``weights``: one vector (shared) or n × m per-response weights (a Dask or
    NumPy array, split like the responses). ``client``: a distributed client (default: the
    current one, else Dask's configured scheduler; False: that scheduler), as lmefast.dask.mixedlm's.
    ``result(name)`` computes that response's column."""
    import dask
    import dask.array as da


    df = as_dataframe(data)
    n = len(df)
    if is_dask_dataframe(responses):
        names = [str(c) for c in responses.columns]
        Y = responses.to_dask_array(lengths=True)
    elif isinstance(responses, da.Array):
        Y = responses if responses.ndim == 2 else responses[:, None]
        names = [f"y{j}" for j in range(Y.shape[1])]
    else:
        raise SpecificationError(f"responses must be a Dask array or DataFrame, not {type(responses).__name__}")
    if Y.ndim != 2 or Y.shape[0] != n:
        raise SpecificationError(f"responses must be an n × m matrix with the {n} rows of data, "
                                 f"got shape {Y.shape}")
    if len(set(names)) != len(names):
        raise SpecificationError("responses have duplicate column names")
    m = Y.shape[1]
    width = int(block or BLOCK)
    Y = Y.astype(float).rechunk({0: -1, 1: width})
    per_response = weights is not None and np.ndim(weights) == 2
    W = None
    if per_response:
        W = da.asarray(weights.to_dask_array(lengths=True) if is_dask_dataframe(weights) else weights)
        if W.shape != (n, m):
            raise SpecificationError(f"per-response weights must be n × m = {n} × {m}, got {W.shape}")
        W = W.astype(float).rechunk(Y.chunks)
    shared = None if per_response else weights
    # the design, its checks and names: the in-memory fit_many on no responses
    base = fit_many(formula, df, np.empty((n, 0)), reml=reml, weights=shared, offset=offset, ddf=ddf)
    nth = 1 if n_threads is None else int(n_threads)
    cl = _default_client(client)
    data_ref = _shared(df, cl)
    y_blocks = Y.to_delayed().ravel()
    if shared is not None:    # rows of zero shared weight are not in the design (the workers drop them)
        w = np.asarray(shared, dtype=float).ravel()
        if not np.all(w > 0):
            Y = Y[np.nonzero(w > 0)[0]]
    w_blocks = W.to_delayed().ravel() if W is not None else [None] * len(y_blocks)
    tasks = [dask.delayed(_fit_columns, pure=False)(data_ref, formula, yb, wb, reml, shared, offset, ddf, nth)
             for yb, wb in zip(y_blocks, w_blocks, strict=True)]
    report = progress_function(progress)
    if report:
        report("response blocks", 0, len(tasks))
    if cl is not None:
        from distributed import as_completed

        futures = cl.compute(tasks)
        order = {f.key: i for i, f in enumerate(futures)}
        parts: list[Any] = [None] * len(futures)
        for done, fut in enumerate(as_completed(futures), start=1):
            parts[order[fut.key]] = fut.result()
            if report:
                report("response blocks", done, len(tasks))
    else:
        parts = list(dask.compute(*tasks))
        if report:
            report("response blocks", len(tasks), len(tasks))
    out = _Out.concatenate([p[0] for p in parts])
    n_observed = np.concatenate([p[1] for p in parts])
    return ManyResults(names, base.exog_names, base.theta_names, out, reml, base.ddf, n_observed,
                       base._n_rows, base._rhs, base._frame, Y, base._rowwise, base._template, W)
