"""Responses drawn from a model at given parameters: statsmodels' ``MixedLM.get_distribution``.

At (β, Ψ = scale · cov_re, vcomp_abs = scale · vcomp, σ² = scale), one draw is

    y = Xβ + Σ_groups Z_g u_g + Σ_components Σ_groups V_cg v_cg + ε,
    u_g ~ N(0, Ψ),  v_cg ~ N(0, vcomp_abs[c] I),  ε ~ N(0, σ² I),

with X and Z the model's exog and exog_re (or the ones given) and V_cg the model's
variance-component designs. ``params`` is statsmodels' packed vector (fixed effects, cov_re's
lower triangle by rows, vcomp; variance parameters relative to ``scale``, not square roots)
or a MixedLMParams. As statsmodels, ``rvs(n)`` returns one response vector (n is ignored).
One grouping factor, no prior weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lmefast.onefactor import OneFactorEngine
from lmefast.params import MixedLMParams, psd_cholesky
from lmefast.smparams import vc_order

if TYPE_CHECKING:
    from lmefast.model import MixedLM

__all__ = ["ModelDistribution"]


def _rng(rng: Any) -> np.random.Generator | np.random.RandomState:
    if isinstance(rng, np.random.Generator | np.random.RandomState):
        return rng
    return np.random.default_rng(rng)


class ModelDistribution:
    """Draws responses from ``model`` at ``params`` and ``scale`` (module docstring)."""

    def __init__(self, model: MixedLM, params: Any, scale: float, exog: Any = None,
                 exog_re: Any = None) -> None:
        if not isinstance(model.engine, OneFactorEngine) or model.api != "statsmodels":
            raise NotImplementedError("get_distribution is for statsmodels' one-grouping-factor models")
        if model.engine.weights is not None:
            raise NotImplementedError("get_distribution with prior weights is not implemented")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        k_fe, k_re = model.k_fe, model.k_re
        pa = params if isinstance(params, MixedLMParams) else MixedLMParams.from_packed(
            np.asarray(params, dtype=float).ravel(), k_fe, k_re, False, True)
        n = model.nobs
        self.model = model
        self.scale = float(scale)
        self.fe_params = np.asarray(pa.fe_params, dtype=float)
        self.cov_re = self.scale * np.atleast_2d(np.asarray(pa.cov_re, dtype=float)).reshape(k_re, k_re)
        self.vcomp = self.scale * np.asarray(pa.vcomp, dtype=float).ravel()
        if self.vcomp.shape[0] != model.k_vc:
            raise ValueError(f"params have {self.vcomp.shape[0]} variance components, the model {model.k_vc}")
        self.exog = model.exog if exog is None else np.asarray(exog, dtype=float).reshape(n, k_fe)
        self.exog_re = model.exog_re if exog_re is None else np.asarray(exog_re, dtype=float).reshape(n, k_re)
        self._sqrt_cov_re = psd_cholesky(0.5 * (self.cov_re + self.cov_re.T)) if k_re else np.zeros((0, 0))
        spec = model.engine.spec
        self.group_codes = spec.group_codes
        self.n_groups = spec.n_groups
        self._rows = model.row_indices
        self._vc = model.exog_vc if model.k_vc else {}
        self._vc_names = vc_order(model.engine)

    def rvs(self, n: int = 1, rng: Any = None) -> np.ndarray:
        """One simulated response vector (``n`` is ignored, as statsmodels'); ``rng`` a seed,
        a numpy Generator or RandomState."""
        rng = _rng(rng)
        y = self.exog @ self.fe_params
        k_re = self.cov_re.shape[0]
        if k_re:
            u = rng.normal(size=(self.n_groups, k_re)) @ self._sqrt_cov_re.T
            y += np.einsum("ij,ij->i", u[self.group_codes], self.exog_re)
        for name, var in zip(self._vc_names, self.vcomp, strict=True):
            sd = np.sqrt(max(var, 0.0))
            for label, V in self._vc[name].items():
                y[self._rows[label]] += V @ (sd * rng.normal(size=V.shape[1]))
        return y + np.sqrt(self.scale) * rng.normal(size=y.shape[0])
