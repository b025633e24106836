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

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lmefast.api import lmer_model
from lmefast.errors import InferenceError, ObjectiveError, SpecificationError
from lmefast.formula import as_dataframe
from lmefast.inference import normalize_ddf, parse_contrast
from lmefast.model import MixedLM, prior_weights_and_offset
from lmefast.optimize import fit_theta
from lmefast.parallel import check_threads, get_num_threads
from lmefast.progress import progress_function
from lmefast.results import MixedLMResults

PLACEHOLDER = "__lmefast_response__"
_DEFAULT = object()       # ddf of the tables: fit_many's unless given
BLOCK = 512           # responses whose Z'y, X'y, y'y are formed together


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
    if isinstance(responses, pd.DataFrame):
        bad = [str(c) for c in responses.columns if not pd.api.types.is_numeric_dtype(responses[c])]
        if bad:
            raise SpecificationError(f"responses: column(s) {bad[:10]} are not numeric")
        names = [str(c) for c in responses.columns]
    elif isinstance(responses, pd.Series):
        names = [str(responses.name) if responses.name is not None else "y0"]
    else:
        names = []
    try:
        Y = np.asarray(responses, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecificationError(f"responses are not numeric: {exc}") from None
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise SpecificationError(f"responses must be an n × m matrix, got {Y.ndim} dimensions")
    if Y.shape[0] != n:
        raise SpecificationError(f"responses have {Y.shape[0]} rows but data has {n}")
    if not names:
        names = [f"y{j}" for j in range(Y.shape[1])]
    if len(set(names)) != len(names):
        raise SpecificationError("responses have duplicate column names")
    return np.asfortranarray(Y), names


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
def satterthwaite_parts(obj: Any, sol: Any) -> tuple[np.ndarray, np.ndarray]:
    """(A, J) of lmerTest's Satterthwaite df at a solution (module docstring): A = 2 H⁻¹ over
    varpar = (θ, σ), J = ∂ vcov(β̂)/∂varpar (p × p × (d + 1))."""
    theta = sol.theta
    d, p = theta.shape[0], sol.beta.shape[0]
    s2 = sol.sigma2
    sigma = float(np.sqrt(s2))
    c = obj.dof
    h = 1e-2 * np.maximum(np.abs(theta), 0.05)

    def at(th: np.ndarray) -> tuple[float, float, np.ndarray]:
        s = obj.solve(th)
        a = s.logdet_L + (2.0 * float(np.sum(np.log(np.diag(s.Lx)))) if obj.reml and p else 0.0)
        Linv = np.linalg.inv(s.Lx) if p else np.zeros((0, 0))
        return a + s.r2 / s2, s.r2, Linv.T @ Linv

    g0, r0, C0 = at(theta)

    def central(scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hh = h * scale
        Hg = np.empty((d, d))
        dr = np.empty(d)
        dC = np.empty((p, p, d))
        for i in range(d):
            e = np.zeros(d)
            e[i] = hh[i]
            gp, rp, Cp = at(theta + e)
            gm, rm, Cm = at(theta - e)
            Hg[i, i] = (gp - 2 * g0 + gm) / hh[i] ** 2
            dr[i] = (rp - rm) / (2 * hh[i])
            dC[:, :, i] = (Cp - Cm) / (2 * hh[i])
            for j in range(i):
                f = np.zeros(d)
                f[j] = hh[j]
                Hg[i, j] = Hg[j, i] = (at(theta + e + f)[0] - at(theta + e - f)[0]
                                       - at(theta - e + f)[0] + at(theta - e - f)[0]) / (4 * hh[i] * hh[j])
        return Hg, dr, dC

    H1, r1, C1 = central(1.0)
    H2, r2, C2 = central(0.5)
    Hg = (4 * H2 - H1) / 3
    dr = (4 * r2 - r1) / 3
    dC = (4 * C2 - C1) / 3
    H = np.empty((d + 1, d + 1))
    H[:d, :d] = 0.5 * (Hg + Hg.T)
    H[:d, d] = H[d, :d] = -2.0 * dr / sigma ** 3
    H[d, d] = 6.0 * r0 / sigma ** 4 - 2.0 * c / s2
    try:
        A = 2.0 * np.linalg.inv(H)
    except np.linalg.LinAlgError:
        A = 2.0 * np.linalg.pinv(H)
    J = np.empty((p, p, d + 1))
    J[:, :, :d] = s2 * dC
    J[:, :, d] = 2.0 * sigma * C0
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

    @classmethod
    def empty(cls, m: int, p: int, d: int) -> _Out:
        nan = np.nan
        return cls(theta=np.full((m, d), nan), beta=np.full((m, p), nan),
                   cov=np.full((m, p, p), nan), A=np.full((m, d + 1, d + 1), nan),
                   J=np.full((m, p, p, d + 1), nan), llf=np.full(m, nan), sigma2=np.full(m, nan),
                   nobs=np.zeros(m, dtype=np.int64), converged=np.zeros(m, dtype=bool),
                   singular=np.zeros(m, dtype=bool), n_evals=np.zeros(m, dtype=np.int64),
                   reason=np.full(m, "", dtype=object))


def _fit_block(design: _Design, Yb: np.ndarray, idx: np.ndarray, out: _Out, reml: bool,
               satterthwaite: bool, beta_pos: np.ndarray, theta_pos: np.ndarray,
               n_threads: int) -> None:
    """Fit the responses Yb (rows of the design × len(idx)) and write them at idx of out."""
    model = design.model
    engine = model.engine
    X, Z = engine.response_design()
    ZtY = np.asarray(Z.T @ Yb)
    XtY = X.T @ Yb
    yty = np.einsum("ij,ij->j", Yb, Yb)
    tm = engine.theta_map
    start = tm.start()
    kept = beta_pos >= 0
    sc = engine.scaling
    reml_offset = sc.reml_offset() if reml else 0.0

    def work(cols: range) -> None:
        template = engine.objective(reml, 1)
        for i in cols:
            j = idx[i]
            try:
                obj = template.with_crossprods(engine.with_response(ZtY[:, i], XtY[:, i], yty[i]))
                sol, opt = fit_theta(obj, start)
                if satterthwaite:
                    A, J = satterthwaite_parts(obj, sol)
            except (ObjectiveError, FloatingPointError, np.linalg.LinAlgError) as exc:
                out.reason[j] = f"the fit failed: {exc}"
                continue
            p = sol.beta.shape[0]
            Linv = np.linalg.inv(sol.Lx) if p else np.zeros((0, 0))
            bp, tp = beta_pos[kept], theta_pos
            # on the user's scale (lmefast.scaling): θ, β = Sβ̃, cov = S cov S'; the
            # Satterthwaite parts stay in the engine's θ (df do not depend on θ's coordinates)
            # with the Jacobian of cov(β) mapped as cov is
            out.theta[j, tp] = sc.theta(tm, sol.theta)
            out.beta[j, bp] = sc.beta(sol.beta)
            out.cov[j][np.ix_(bp, bp)] = sc.cov_beta(sol.sigma2 * (Linv.T @ Linv))
            if satterthwaite:
                out.A[j][np.ix_(np.append(tp, -1), np.append(tp, -1))] = A
                out.J[j][np.ix_(bp, bp, np.append(tp, -1))] = (
                    J if sc.is_identity else np.einsum("ab,bcd,ec->aed", sc.fixed, J, sc.fixed))
            out.llf[j] = -0.5 * (sol.objective + reml_offset)
            out.sigma2[j] = sol.sigma2
            out.nobs[j] = engine.nobs
            out.converged[j] = opt.converged
            out.singular[j] = opt.singular
            out.n_evals[j] = opt.n_evals

    nth = max(1, min(n_threads, len(idx)))
    if nth == 1:
        work(range(len(idx)))
        return
    bounds = np.linspace(0, len(idx), nth + 1).astype(int)
    with ThreadPoolExecutor(nth) as pool:
        list(pool.map(work, [range(bounds[t], bounds[t + 1]) for t in range(nth)]))


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
    fitted (``status()``). ``weights`` (one per row: lme4's prior weights, zero drops a row)
    and ``offset`` (one per row, subtracted from every response) are shared by all responses
    (per-response weights are not implemented). ``ddf``: 'satterthwaite' (lmerTest),
    'residual', or None (z tests).
    ``n_threads``: threads across responses (default lmefast.parallel.get_num_threads()).
    ``progress``: True prints, a callable(stage, done, total) receives reports."""
    rhs = _right_hand_side(formula)
    df = as_dataframe(data)
    n = len(df)
    Y, names = _response_matrix(responses, n)
    m = Y.shape[1]
    ddf = normalize_ddf(ddf)
    if ddf == "kenward-roger":
        raise InferenceError("fit_many computes Satterthwaite, residual or z tests; for Kenward-Roger "
                             "take one response's fit: res.result(name).coef_table(ddf='kenward-roger')")
    w, off = prior_weights_and_offset(weights, offset, n)
    if w is not None and not np.all(w > 0):       # zero weights: those rows are dropped
        keep = np.nonzero(w > 0)[0]
        df, Y, w = df.iloc[keep].reset_index(drop=True), np.asfortranarray(Y[keep]), w[keep]
        off = off[keep] if off is not None else None
        n = len(df)
    nth = get_num_threads() if n_threads is None else check_threads(n_threads)
    report = progress_function(progress)

    frame = df.copy(deep=False)
    frame[PLACEHOLDER] = np.arange(n, dtype=float)
    f = f"{PLACEHOLDER} ~ {rhs}"
    rowwise = {"weights": w, "offset": off}

    def design_model(rows: np.ndarray | None) -> MixedLM:
        if rows is None:
            return lmer_model(f, frame, **rowwise)
        return lmer_model(f, frame.iloc[rows].reset_index(drop=True),
                          **{k: None if v is None else v[rows] for k, v in rowwise.items()})

    main = _Design(None, design_model(None))
    beta_names = main.model.exog_names
    theta_names = _theta_names(main.model)
    out = _Out.empty(m, len(beta_names), len(theta_names))

    finite = np.isfinite(Y)
    complete = finite.all(axis=0)
    n_obs = finite.sum(axis=0)
    spread = np.zeros(m)
    spread[complete] = np.ptp(Y[:, complete], axis=0) if complete.any() else 0.0
    for j in np.nonzero(~complete & (n_obs > 0))[0]:
        spread[j] = np.ptp(Y[finite[:, j], j])
    groups: dict[bytes, list[int]] = defaultdict(list)
    for j in range(m):
        if n_obs[j] == 0:
            out.reason[j] = "all values are missing"
        elif not spread[j] > 0:
            out.reason[j] = "the response is constant: there is no variance to model"
        else:
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
            _fit_block(design, Yb, idx, out, reml, ddf == "satterthwaite", beta_pos, theta_pos, nth)
            done += len(idx)
            if report is not None:
                report("responses", done, total)
    return ManyResults(names, beta_names, theta_names, out, reml, ddf, n_obs, n, rhs, frame,
                       Y, rowwise, main.model)


# -- results --------------------------------------------------------------------------------------
class ManyResults:
    """The fits of ``fit_many``: one row per response in ``status()``, long tables over the
    fitted responses (``coef_table``, ``varcorr``, ``t_test``), and ``result(name)`` for one
    response's full results."""

    def __init__(self, names: list[str], beta_names: list[str], theta_names: list[str], out: _Out,
                 reml: bool, ddf: str | None, n_observed: np.ndarray, n_rows: int, rhs: str,
                 frame: pd.DataFrame, Y: np.ndarray, rowwise: dict, template: MixedLM) -> None:
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
        for missing values, convergence, singularity, log-likelihood."""
        o = self._out
        return pd.DataFrame({"fitted": o.reason == "", "reason": o.reason, "nobs": o.nobs,
                             "dropped_missing": self._n_rows - self._n_observed,
                             "converged": o.converged, "singular": o.singular, "llf": o.llf},
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
        y = self._Y[:, j]
        rows = np.nonzero(np.isfinite(y))[0]
        frame = self._frame.iloc[rows].reset_index(drop=True).copy(deep=False)
        frame[PLACEHOLDER] = y[rows]
        model = lmer_model(f"{PLACEHOLDER} ~ {self._rhs}", frame,
                           **{k: None if v is None else v[rows] for k, v in self._rowwise.items()})
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

