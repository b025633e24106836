"""Results of a fit: statsmodels' names and meanings, lme4's numbers — one class for every
model, whose shapes follow the API the model was written in (``model.api``), not its engine.

Immutable: everything is derived from (model, θ̂, the solution at θ̂) when first asked for,
by asking the model's engine (lmefast.engine.Engine). Variances: cov_re = σ̂² T T',
vcomp = σ̂² θ_vc². Fixed-effect standard errors are lme4's, vcov(β̂) = σ̂² (Rx'Rx)⁻¹,
conditional on θ̂. Variance parameters' standard errors come from the observed information of
the profiled objective in statsmodels' parametrisation (cov_re/scale, vcomp/scale), by central
differences; NaN at a boundary.

Shapes: statsmodels' API (``MixedLM``, ``mixedlm``): ``cov_re`` one DataFrame, ``vcomp`` an
array, ``random_effects`` {group label: Series}; lme4's (``lmer``): ``cov_re`` and
``random_effects`` dicts keyed by grouping factor, ``random_effects_cov`` levels × k × k arrays.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from lmefast.errors import SpecificationError
from lmefast.objective import KernelObjective, Solution
from lmefast.optimize import OptSummary
from lmefast.params import MixedLMParams
from lmefast.progress import progress_function

if TYPE_CHECKING:
    from lmefast.model import MixedLM


class MixedLMResults:
    """A fitted linear mixed model (``MixedLM.fit()``)."""

    def __init__(self, model: MixedLM, objective: KernelObjective, solution: Solution,
                 optsummary: OptSummary) -> None:
        self.model = model
        self._objective = objective
        self._sol = solution
        self._derived: dict[str, Any] = {}
        self.optsummary = self._user_optsummary(optsummary)

    # -- pickling: the C kernel is not pickled but rebuilt from the cross-products ----------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        obj = state.pop("_objective")
        state["_objective_args"] = (obj.reml, getattr(obj, "n_threads", None))
        state["_derived"] = {}          # derived parts may hold kernels; they are made again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reml, n_threads = state.pop("_objective_args")
        self.__dict__.update(state)
        self._objective = self.model.engine.objective(reml, n_threads)

    def derived(self, key: str, make: Callable[[], Any]) -> Any:
        """A quantity derived from the fit (e.g. the Kenward-Roger parts, a profiler), made
        once by ``make`` and kept with the results."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def engine(self):
        return self.model.engine

    @property
    def _lme4_api(self) -> bool:
        return self.model.api == "lme4"

    # -- the fit ---------------------------------------------------------------------------
    @property
    def reml(self) -> bool:
        return self._objective.reml

    @property
    def method(self) -> str:
        return "REML" if self.reml else "ML"

    @property
    def theta(self) -> np.ndarray:
        """θ̂: lower triangle of T by columns, then the variance components' θ (lme4's order),
        on the user's scale."""
        return self._scaling.theta(self.engine.theta_map, self._sol.theta)

    @property
    def unidentifiable(self) -> bool:
        """A term has as many random effects as observations (or more): its variances and the
        residual variance are confounded (statsmodels' API fits such models with a warning)."""
        return not self.engine.identifiable

    @property
    def converged(self) -> bool:
        return self.optsummary.converged

    @property
    def singular(self) -> bool:
        """lme4's isSingular: a diagonal θ at (or within 1e-4 of) zero."""
        return self.optsummary.singular

    @property
    def nobs(self) -> int:
        return self.model.nobs

    @property
    def k_fe(self) -> int:
        return self.model.k_fe

    @property
    def k_re(self) -> int:
        return self.model.k_re

    @cached_property
    def _variance_params(self) -> list[tuple[int, int, int]]:
        """The engine's variance parameters; in statsmodels' API the random coefficients'
        whole lower triangle (by rows), also where a constrained fit (``fit(free=...)``) holds
        covariances at 0, as statsmodels lists them."""
        pars = self.engine.variance_params()
        if self._lme4_api:
            return pars
        terms = self.engine.covariance_terms()
        out: list[tuple[int, int, int]] = []
        for j, c in enumerate(terms):
            if c.role == "coef":
                k = len(c.coef_names)
                out.extend((j, r, col) for r in range(k) for col in range(r + 1))
            else:
                out.extend(p for p in pars if p[0] == j)
        return out

    @property
    def k_re2(self) -> int:
        """Number of free entries of cov_re (statsmodels' k_re2)."""
        return sum(1 for j, _, _ in self._variance_params
                   if self.engine.covariance_terms()[j].role == "coef")

    @property
    def k_vc(self) -> int:
        return self.model.k_vc

    @property
    def n_groups(self) -> int:
        return self.model.n_groups

    @property
    def df_modelwc(self) -> int:
        """Number of estimated parameters: β, θ and σ."""
        return self.k_fe + self.model.theta_map.n_theta + 1

    @property
    def df_resid(self) -> int:
        return self.nobs - self.k_fe

    @property
    def scale(self) -> float:
        """Residual variance σ̂²."""
        return self._sol.sigma2

    @property
    def sigma(self) -> float:
        return float(np.sqrt(self._sol.sigma2))

    @property
    def llf(self) -> float:
        """Log-likelihood (REML log-likelihood for REML fits, as lme4's and statsmodels')."""
        return -0.5 * self.objective

    @property
    def objective(self) -> float:
        """lme4's objective: REML criterion or deviance (−2 llf)."""
        return self._sol.objective + self._objective_offset

    @property
    def aic(self) -> float:
        """−2 llf + 2 (parameters). For REML fits this is lme4's REML-based AIC
        (statsmodels returns NaN there); compare AICs only between ML fits."""
        return -2.0 * self.llf + 2.0 * self.df_modelwc

    @property
    def bic(self) -> float:
        """−2 llf + log(n) (parameters), lme4's convention (also for REML fits)."""
        return -2.0 * self.llf + np.log(self.nobs) * self.df_modelwc

    # -- fixed effects ---------------------------------------------------------------------
    @cached_property
    def _fe_params_pd(self) -> pd.Series:
        return pd.Series(self._beta, index=self.model.exog_names)

    @cached_property
    def _cov_fe(self) -> np.ndarray:
        """vcov(β̂) on the user's scale."""
        return self._scaling.cov_beta(self._cov_fe_engine)

    @cached_property
    def _bse_fe_pd(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_fe)), index=self.model.exog_names)

    # -- variance parameters ----------------------------------------------------------------
    @cached_property
    def _Ts(self) -> list[np.ndarray]:
        return self._scaling.Ts(self.engine.theta_map.Ts(self._sol.theta))

    def _cov_of(self, j: int) -> np.ndarray:
        T = self._Ts[j]
        return self.scale * (T @ T.T)

    @cached_property
    def _cov_re_pd(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Covariance of the random coefficients, σ̂² T T': one DataFrame (statsmodels' API:
        the group's coefficients; empty for the one-group spelling of crossed effects), or per
        grouping factor (lme4's API)."""
        terms = self.engine.covariance_terms()
        if self._lme4_api:
            return {c.factor: pd.DataFrame(self._cov_of(j), index=list(c.coef_names),
                                           columns=list(c.coef_names))
                    for j, c in enumerate(terms) if c.role == "coef"}
        for j, c in enumerate(terms):
            if c.role == "coef":
                return pd.DataFrame(self._cov_of(j), index=list(c.coef_names), columns=list(c.coef_names))
        return pd.DataFrame(np.zeros((0, 0)))

    @cached_property
    def vcomp(self) -> np.ndarray:
        """Variances of the variance components, σ̂² θ_vc², in the order they were given."""
        terms = self.engine.covariance_terms()
        var = {c.vc_name: float(self._cov_of(j)[0, 0]) for j, c in enumerate(terms) if c.role == "vc"}
        order = self.engine.vc_order or tuple(var)
        return np.array([var[name] for name in order])

    @cached_property
    def _cov_re_unscaled_pd(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """cov_re / scale (= T T'), statsmodels' cov_re_unscaled."""
        if self._lme4_api:
            return {name: frame / self.scale for name, frame in self._cov_re_pd.items()}
        return self._cov_re_pd / self.scale

    @property
    def params_object(self) -> MixedLMParams:
        """statsmodels' MixedLMParams at the estimates (cov_re, vcomp relative to σ²); it
        remembers the criterion of the fit, so ``model.loglike(res.params_object)`` is llf."""
        from lmefast.smparams import params_at

        pa = params_at(self.engine, self.theta, self._beta)
        pa.reml = self.reml
        return pa

    @cached_property
    def _re_param_names(self) -> list[str]:
        """statsmodels' names ("Pig Var", "Pig x Time Cov", "cask Var"); lme4's API carries the
        grouping factor's name in front ("Pig (Intercept) Var")."""
        terms = self.engine.covariance_terms()
        out = []
        for j, r, c in self._variance_params:
            term = terms[j]
            if term.role == "vc":
                out.append(f"{term.vc_name} Var")
                continue
            prefix = f"{term.factor} " if self._lme4_api else ""
            a, b = term.coef_names[r], term.coef_names[c]
            out.append(f"{prefix}{a} Var" if r == c else f"{prefix}{b} x {a} Cov")
        return out

    def _psi_at(self, theta: np.ndarray) -> np.ndarray:
        """statsmodels' variance parameters at the engine's θ: the entries of T_j T_j' on the
        user's scale (= covariance / scale) in the engine's order of params."""
        Ts = self._scaling.Ts(self.engine.theta_map.Ts(np.asarray(theta, dtype=float)))
        S = [T @ T.T for T in Ts]
        return np.array([S[j][r, c] for j, r, c in self._variance_params], dtype=float)

    @cached_property
    def _psi(self) -> np.ndarray:
        return self._psi_at(self._sol.theta)

    @cached_property
    def _cov_psi(self) -> np.ndarray:
        """Inverse observed information of ψ (statsmodels' scaled variance parameters), by the
        delta method from θ: cov ψ = J (½ H_θ)⁻¹ J' with H_θ the Hessian of the profiled
        objective (central differences of the analytic gradient) and J = ∂ψ/∂θ (ψ is quadratic
        in θ, so central differences give it exactly). NaN at a boundary."""
        theta = self._sol.theta
        d = theta.shape[0]
        if d == 0:
            return np.zeros((0, 0))
        if self.singular:
            return np.full((d, d), np.nan)
        obj = self._objective
        lower = self.engine.theta_map.lower_bounds()
        H = np.empty((d, d))
        J = np.empty((self._psi.shape[0], d))
        try:
            for j in range(d):
                h = 1e-5 * max(abs(theta[j]), 1e-2)
                up, dn = theta.copy(), theta.copy()
                up[j] += h
                dn[j] = max(theta[j] - h, lower[j])
                step = up[j] - dn[j]
                H[:, j] = (obj.solve(up, want_grad=True).grad
                           - obj.solve(dn, want_grad=True).grad) / step
                J[:, j] = (self._psi_at(up) - self._psi_at(dn)) / step
            cov_theta = np.linalg.inv(0.25 * (H + H.T))
        except (np.linalg.LinAlgError, FloatingPointError):
            return np.full((d, d), np.nan)
        return J @ cov_theta @ J.T

    @cached_property
    def _params_pd(self) -> pd.Series:
        """statsmodels' params: fixed effects, then cov_re/scale (lower triangle), vcomp/scale."""
        return pd.Series(np.concatenate([self._beta, self._psi]),
                         index=self.model.exog_names + self._re_param_names)

    def _cov_params_pd(self) -> pd.DataFrame:
        """Covariance of params: lme4's σ̂²(Rx'Rx)⁻¹ for β; inverse observed information of
        the variance parameters (independent of β̂ by the block structure of the information)."""
        p = self.k_fe
        d = self._psi.shape[0]
        C = np.zeros((p + d, p + d))
        C[:p, :p] = self._cov_fe
        C[p:, p:] = self._cov_psi
        names = list(self._params_pd.index)
        return pd.DataFrame(C, index=names, columns=names)

    @cached_property
    def _bse_pd(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_params_pd().to_numpy())), index=self._params_pd.index)

    @cached_property
    def _bse_re_pd(self) -> pd.Series:
        return self._bse_pd.iloc[self.k_fe:]

    @cached_property
    def _tvalues_pd(self) -> pd.Series:
        return self._params_pd / self._bse_pd

    @cached_property
    def _pvalues_pd(self) -> pd.Series:
        """Two-sided p-values from the normal distribution (statsmodels' z-tests)."""
        return pd.Series(2.0 * stats.norm.sf(np.abs(self._tvalues_pd.to_numpy())),
                         index=self._params_pd.index)

    def conf_int(self, alpha: float = 0.05, method: str | None = None, level: float | None = None,
                 **kwargs) -> pd.DataFrame:
        """Wald intervals for params (normal quantiles), statsmodels' layout. With
        ``method='profile'|'wald'|'bootstrap'`` (and ``level``): lme4's confint, see
        lmefast.profile.conf_int."""
        if method is not None or level is not None or kwargs:
            from lmefast.profile import conf_int

            return conf_int(self, method=method or "profile",
                            level=1 - alpha if level is None else level, **kwargs)
        q = stats.norm.ppf(1 - alpha / 2)
        lo = self._params_pd - q * self._bse_pd
        hi = self._params_pd + q * self._bse_pd
        return self._typed(pd.DataFrame({0: lo, 1: hi}))

    # -- statsmodels' output types: pandas for pandas or formula data, ndarrays for arrays --------
    def _typed(self, value: Any) -> Any:
        if self.model.pandas_output or isinstance(value, dict):
            return value
        return value.to_numpy()

    @property
    def fe_params(self) -> pd.Series | np.ndarray:
        """β̂ (a Series named by the fixed effects; an array for array data, as statsmodels)."""
        return self._typed(self._fe_params_pd)

    @property
    def bse_fe(self) -> pd.Series | np.ndarray:
        return self._typed(self._bse_fe_pd)

    @property
    def cov_re(self) -> Any:
        """Covariance of the random coefficients, σ̂² T T' (see _cov_re_pd)."""
        return self._typed(self._cov_re_pd)

    @property
    def cov_re_unscaled(self) -> Any:
        """cov_re / scale (= T T'), statsmodels' cov_re_unscaled."""
        return self._typed(self._cov_re_unscaled_pd)

    @property
    def params(self) -> pd.Series | np.ndarray:
        """statsmodels' params: fixed effects, then cov_re/scale (lower triangle), vcomp/scale."""
        return self._typed(self._params_pd)

    def cov_params(self) -> pd.DataFrame | np.ndarray:
        """Covariance of params (see _cov_params_pd)."""
        return self._typed(self._cov_params_pd())

    @property
    def bse(self) -> pd.Series | np.ndarray:
        return self._typed(self._bse_pd)

    @property
    def bse_re(self) -> pd.Series | np.ndarray:
        return self._typed(self._bse_re_pd)

    @property
    def tvalues(self) -> pd.Series | np.ndarray:
        return self._typed(self._tvalues_pd)

    @property
    def pvalues(self) -> pd.Series | np.ndarray:
        """Two-sided p-values from the normal distribution (statsmodels' z-tests)."""
        return self._typed(self._pvalues_pd)

    # -- random effects and fitted values ---------------------------------------------------
    @cached_property
    def random_effects(self) -> dict:
        """Conditional modes: statsmodels' API {group label: Series of its modes}; lme4's API
        {grouping factor: DataFrame levels × coefficients} (lme4's ranef)."""
        if self._lme4_api:
            return self.engine.modes_by_factor(self._objective, self._sol)
        return self.engine.modes_by_group(self._objective, self._sol)

    @cached_property
    def random_effects_frame(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Conditional modes of the random coefficients as a table: one row per group
        (one grouping factor), or a dict of such tables per grouping factor."""
        frames = self.engine.modes_by_factor(self._objective, self._sol)
        if len(frames) == 1 and not self._lme4_api:
            frame = next(iter(frames.values()))
            return frame[self.model.exog_re_names]
        return frames

    @cached_property
    def random_effects_cov(self) -> dict:
        """Conditional covariances of the random effects (lme4's condVar, conditional on β̂):
        statsmodels' API {group label: DataFrame}; lme4's API {factor: levels × k × k}."""
        if self._lme4_api:
            return self.engine.condvar_by_factor(self._objective, self._sol)
        return self.engine.condvar_by_group(self._objective, self._sol)

    @property
    def fittedvalues(self) -> Any:
        """Conditional fitted values Xβ̂ + Zb̂: a Series for pandas or formula data, an array for
        arrays (for chunked data another pass over the data, by its source: a lazy Dask Series
        for Dask data)."""
        if self.model.source is not None:
            return self.model.source.fitted(self, resid=False)
        return self._rows(self._fitted.copy(), "fittedvalues")

    @cached_property
    def _fitted(self) -> np.ndarray:
        return self.engine.fitted(self._objective, self._sol)

    @property
    def resid(self) -> Any:
        if self.model.source is not None:
            return self.model.source.fitted(self, resid=True)
        fitted = self._fitted   # first: a model without rows says so here
        return self._rows(self.engine.response() - fitted, "resid")

    def _rows(self, values: np.ndarray, name: str) -> pd.Series | np.ndarray:
        """One value per row: a Series for pandas or formula data (statsmodels), else an array."""
        return pd.Series(values, name=name) if self.model.pandas_output else values

    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: per term, variances and covariances
        (vcov) with standard deviations and correlations (sdcor); then the residual."""
        rows = []
        for group, names, T, free in self.model.covariance_terms(self._sol.theta):
            cov = self.scale * (T @ T.T)
            sd = np.sqrt(np.diag(cov))
            for i, name in enumerate(names):
                rows.append((group, name, None, cov[i, i], sd[i]))
            for j in range(len(names)):
                for i in range(j + 1, len(names)):
                    if free[i, j]:  # correlated pair (not across uncorrelated blocks)
                        corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                        rows.append((group, names[j], names[i], cov[i, j], corr))
        rows.append(("Residual", None, None, self.scale, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def _variance_rows(self) -> list[tuple[str, float, float]]:
        """(name, estimate, std. error) of the variance parameters for the summary table:
        covariance entries on the absolute scale, std. errors by the delta method with σ̂²
        held fixed."""
        se = self._bse_re_pd.to_numpy()
        return [(name, self.scale * psi, self.scale * s)
                for name, psi, s in zip(self._re_param_names, self._psi, se, strict=True)]

    def _group_sizes(self) -> dict[str, np.ndarray]:
        return self.engine.group_sizes()

    def summary(self, yname: str | None = None, xname_fe: list[str] | None = None,
                xname_re: list[str] | None = None, title: str | None = None, alpha: float = 0.05,
                ddf: str | None = None):
        """statsmodels' summary: an object with ``tables`` (DataFrames), ``as_text()``,
        ``as_html()``, ``as_latex()``; ``xname_fe``/``xname_re`` rename the fixed effects and
        variance parameters, ``title`` replaces the title. ``ddf`` ('satterthwaite',
        'kenward-roger', 'residual') gives t-tests of the fixed effects instead of z-tests."""
        from lmefast.summary import Summary

        return Summary(self, alpha, ddf, yname=yname, xname_fe=xname_fe, xname_re=xname_re,
                       title=title)

    def __repr__(self) -> str:
        return (f"<MixedLMResults {self.method}: llf={self.llf:.4f}, "
                f"converged={self.converged}, singular={self.singular}>")

    # -- the user's scale (lmefast.scaling) ---------------------------------------------------
    # The engine fits centred and scaled designs; ``_sol`` and ``_objective`` are the engine's
    # (θ̃, β̃, its objective), and inference that evaluates the objective works on them. What
    # the results report is mapped back here, once.
    @property
    def _scaling(self):
        return self.engine.scaling

    @cached_property
    def _beta(self) -> np.ndarray:
        """β̂ = S β̃."""
        return self._scaling.beta(self._sol.beta)

    @cached_property
    def _cov_fe_engine(self) -> np.ndarray:
        """vcov(β̃) = σ̂² (Rx Rx')⁻¹ on the engine's design."""
        if self.k_fe == 0:
            return np.zeros((0, 0))
        Linv = np.linalg.inv(self._sol.Lx)
        return self.scale * (Linv.T @ Linv)

    @property
    def _objective_offset(self) -> float:
        """The user's REML criterion minus the engine's (log|X'V⁻¹X| changes with the design's
        scale); 0 for ML, whose deviance is invariant."""
        return self._scaling.reml_offset() if self.reml else 0.0

    def _user_optsummary(self, opt: OptSummary) -> OptSummary:
        sc, tm = self._scaling, self.engine.theta_map
        if sc.is_identity:
            return opt
        off = self._objective_offset
        with np.errstate(all="ignore"):
            return replace(opt, theta_initial=sc.theta(tm, opt.theta_initial),
                           theta_final=sc.theta(tm, opt.theta_final),
                           objective_initial=opt.objective_initial + off,
                           objective_final=opt.objective_final + off,
                           log=[(i, f + off) for i, f in opt.log])

    # -- inference (issue 4) --
    def coef_table(self, ddf: str | None = "satterthwaite", alpha: float = 0.05) -> pd.DataFrame:
        """Fixed effects with small-sample t-tests (lmefast.inference.coef_table)."""
        from lmefast.inference import coef_table

        return coef_table(self, ddf, alpha)

    def t_test(self, r_matrix, cov_p=None, use_t: bool | None = None, *, ddf: str | None = None,
               rhs=None, alpha: float = 0.05, joint: bool = False):
        """Tests of contrasts of the fixed effects (a matrix with k_fe columns, or a string such
        as ``"Time = 0"``): statsmodels' contrast results (``effect``, ``sd``, ``tvalue``,
        ``pvalue``, ``conf_int()``), z tests as statsmodels by default; ``ddf``
        ('satterthwaite', 'kenward-roger', 'residual'; ``use_t=True`` is 'residual') gives t
        tests; ``joint=True`` one F test of all rows (lmefast.inference)."""
        from lmefast.inference import contrast_test

        if cov_p is not None:
            raise NotImplementedError("t_test(cov_p=...) is not supported: the fit's covariance is used")
        if use_t and ddf is None:
            ddf = "residual"
        return contrast_test(self, r_matrix, ddf, rhs, alpha, joint)

    def f_test(self, r_matrix, cov_p=None, invcov=None, *, ddf: str | None = None, rhs=None):
        """Joint F test of contrasts of the fixed effects (statsmodels' f_test; F = χ²/q with
        infinite denominator df by default, small-sample df with ``ddf``)."""
        from lmefast.inference import contrast_test

        if cov_p is not None or invcov is not None:
            raise NotImplementedError("f_test(cov_p=, invcov=) is not supported: the fit's covariance is used")
        return contrast_test(self, r_matrix, ddf, rhs, joint=True)

    def wald_test(self, r_matrix, cov_p=None, invcov=None, use_f: bool | None = None, *,
                  ddf: str | None = None, rhs=None, **kwargs):
        """Joint Wald test of contrasts of the fixed effects: χ² (statsmodels' default), or F
        with ``use_f=True`` / ``ddf``."""
        from lmefast.inference import contrast_test

        if cov_p is not None or invcov is not None:
            raise NotImplementedError("wald_test(cov_p=, invcov=) is not supported")
        unknown = sorted(set(kwargs) - {"df_constraints", "scalar"})
        if unknown:
            raise TypeError(f"wald_test() got unexpected keyword argument(s) {unknown}")
        return contrast_test(self, r_matrix, ddf, rhs, joint=True,
                             chi2=not use_f and ddf is None)

    def anova(self, ddf: str | None = "satterthwaite", type: int = 3) -> pd.DataFrame:
        """Type-3 F tests per fixed-effects term (lmefast.inference.anova)."""
        from lmefast.inference import anova

        return anova(self, ddf, type)

    def profile(self, parm=None, alphamax: float = 0.01, n_points: int = 21) -> pd.DataFrame:
        """Likelihood profile traces (lmefast.profile.profile)."""
        from lmefast.profile import profile

        return profile(self, parm, alphamax, n_points)

    def bootstrap(self, n: int, seed=None, n_jobs: int | None = None):
        """Parametric bootstrap (lmefast.bootstrap.bootstrap)."""
        from lmefast.bootstrap import bootstrap

        return bootstrap(self, n, seed, n_jobs)

    def simulate(self, n: int = 1, seed=None, include_random: bool = True) -> np.ndarray:
        """Responses simulated from the fit (lmefast.bootstrap.simulate)."""
        from lmefast.bootstrap import simulate

        return simulate(self, n, seed, include_random)

    def predict(self, exog=None, transform: bool = True, *, include_random: bool = False,
                new_levels: str = "population", newdata=None, **kwargs) -> Any:
        """Predictions: Xβ̂ (the fixed effects only, statsmodels' meaning) for the fitted rows
        or for new data — a DataFrame (the formula's columns) or an exog array. With
        ``include_random=True``, Xβ̂ + Zb̂: conditional on the groups' predicted random effects
        (a group not in the fit gets Xβ̂ with ``new_levels='population'``, or raises with
        'error'); see lmefast.predict.predict. For chunked data, another pass by the data
        source (a pandas or Dask DataFrame, a Parquet path)."""
        if newdata is not None and exog is not None:
            raise TypeError("give the new data as exog (or newdata), not both")
        if isinstance(exog, np.ndarray | list):
            kwargs["exog"] = exog
        elif exog is not None:          # a DataFrame, a Dask DataFrame or a Parquet path
            newdata = exog
        source = self.model.source
        if source is not None and source.predicts:
            if new_levels not in ("population", "error"):
                raise SpecificationError(f"new_levels must be 'population' or 'error', not {new_levels!r}")
            if kwargs:
                raise SpecificationError(f"predict from chunked data takes newdata only, not {sorted(kwargs)}")
            return source.predict(self, newdata, include_random, new_levels)
        from lmefast.predict import predict

        return predict(self, newdata, include_random, new_levels, **kwargs)

    def plot(self, kind: str = "caterpillar", **kwargs):
        """A matplotlib Figure of the fit (lmefast.plots): 'caterpillar' (conditional modes with
        conditional-variance intervals per grouping factor), 'profile' (ζ traces), 'residuals'
        (against fitted values), 'qq' (normal quantiles of the modes)."""
        from lmefast.plots import plot

        return plot(self, kind, **kwargs)

    # -- chunked data: what needs the rows is another pass by the data source -----------------
    def fitted_chunks(self, progress: Any = None):
        """Another pass over chunked data: one DataFrame (fittedvalues, resid) per chunk."""
        if self.model.source is None:
            raise TypeError("fitted_chunks() is for models fitted from chunked data; use fittedvalues")
        return self.model.source.fitted_chunks(self, progress_function(progress))

    def write_fitted(self, path: Any, progress: Any = None) -> int:
        """Fitted values and residuals written to a Parquet file by another pass over the data
        (Parquet fits; for Dask use ``res.fittedvalues.to_frame().to_parquet(...)``)."""
        if self.model.source is None:
            raise TypeError("write_fitted() is for models fitted from chunked data")
        return self.model.source.write_fitted(self, path, progress_function(progress))

    # -- statsmodels' persistence -------------------------------------------------------------
    def remove_data(self) -> None:
        """statsmodels' ``remove_data``: a no-op kept for compatibility. lmefast's results hold
        the cross-products (size O(groups), not O(rows)) and the model's design, which
        fitted values and residuals need; summaries and tests work as before."""

    def save(self, fname: Any, remove_data: bool = False) -> None:
        """Pickle the results to ``fname`` (a path or a binary file), statsmodels' ``save``."""
        import pickle

        if remove_data:
            self.remove_data()
        if hasattr(fname, "write"):
            pickle.dump(self, fname)
            return
        with open(fname, "wb") as fh:
            pickle.dump(self, fh)

    @classmethod
    def load(cls, fname: Any) -> MixedLMResults:
        """Results saved with ``save`` (only load files you trust: this is pickle)."""
        import pickle

        if hasattr(fname, "read"):
            return pickle.load(fname)
        with open(fname, "rb") as fh:
            return pickle.load(fh)

    def profile_re(self, re_ix, vtype: str, num_low: int = 5, dist_low: float = 1.0, num_high: int = 5,
                   dist_high: float = 1.0, **fit_kwargs) -> np.ndarray:
        """statsmodels' profile likelihood of one variance parameter (lmefast.profile.profile_re):
        rows of (variance, llf)."""
        from lmefast.profile import profile_re

        return profile_re(self, re_ix, vtype, num_low, dist_low, num_high, dist_high, **fit_kwargs)
