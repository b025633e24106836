"""Results of a model with several grouping factors: the MixedLMResults interface, with the
random-effects parts given per grouping factor."""
from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from lmefast.results import MixedLMResults


class MultiResults(MixedLMResults):
    """A fitted model with several grouping factors (``lmer``).

    ``cov_re`` and ``random_effects`` are dicts keyed by grouping factor; ``params`` holds the
    fixed effects and, per term, the entries of T T' (= covariance / scale), statsmodels'
    scaled parametrisation.

    A model written in statsmodels' one-group spelling of crossed effects keeps statsmodels'
    shapes: ``vcomp`` (one variance per variance component, in the order given),
    ``cov_re`` (empty), ``random_effects`` {group: Series "name[level]"}, ``n_groups`` 1."""

    @property
    def _statsmodels_spelling(self) -> bool:
        return self.model.statsmodels_group is not None

    @property
    def k_re(self) -> int:
        return sum(t.k for t in self.model.terms)

    @property
    def k_vc(self) -> int:
        return 0

    @property
    def n_groups(self) -> dict[str, int] | int:
        if self._statsmodels_spelling:
            return 1
        return {t.name: t.m for t in self.model.terms}

    @cached_property
    def _Ts(self) -> list[np.ndarray]:
        return self.model.theta_map.Ts(self._sol.theta)

    @cached_property
    def cov_re(self) -> dict[str, pd.DataFrame] | pd.DataFrame:
        """Covariance of each factor's random coefficients, σ̂² T_j T_j' (statsmodels'
        spelling: the group's random coefficients, none)."""
        if self._statsmodels_spelling:
            return pd.DataFrame(np.zeros((0, 0)))
        return {t.name: pd.DataFrame(self.scale * (T @ T.T), index=list(t.coef_names),
                                     columns=list(t.coef_names))
                for t, T in zip(self.model.terms, self._Ts, strict=True)}

    @cached_property
    def vcomp(self) -> np.ndarray:
        """statsmodels' spelling: the variance of each variance component, in the given order."""
        if not self._statsmodels_spelling:
            return np.zeros(0)
        var = {t.name: self.scale * float(T[0, 0]) ** 2
               for t, T in zip(self.model.terms, self._Ts, strict=True)}
        return np.array([var[name] for name in self.model.vc_order])

    def _free_pairs(self):
        for t, T in zip(self.model.terms, self._Ts, strict=True):
            rows, cols = t.pattern
            for r, c in zip(rows, cols, strict=True):
                yield t, T, int(r), int(c)

    @cached_property
    def _re_param_names(self) -> list[str]:
        out = []
        for t, _, r, c in self._free_pairs():
            a, b = t.coef_names[r], t.coef_names[c]
            if self._statsmodels_spelling:
                out.append(f"{t.name} Var")
            else:
                out.append(f"{t.name} {a} Var" if r == c else f"{t.name} {b} x {a} Cov")
        return out

    def _psi_at(self, theta: np.ndarray) -> np.ndarray:
        out = []
        for t, T in zip(self.model.terms, self.model.theta_map.Ts(np.asarray(theta, float)),
                        strict=True):
            S = T @ T.T
            out.extend(S[r, c] for r, c in zip(*t.pattern, strict=True))
        return np.array(out)

    def _variance_rows(self) -> list[tuple[str, float, float]]:
        se = self.bse_re.to_numpy()
        return [(name, self.scale * psi, self.scale * s)
                for name, psi, s in zip(self._re_param_names, self._psi, se, strict=True)]

    def _group_sizes(self) -> dict[str, np.ndarray]:
        return self.model.group_sizes()

    @cached_property
    def _modes_list(self) -> list[np.ndarray]:
        return self._objective.modes(self._sol)

    @cached_property
    def random_effects(self) -> dict:
        """Conditional modes per grouping factor: a DataFrame levels × coefficients (lme4's
        ``ranef``); statsmodels' spelling: {group: Series indexed "name[level]"}."""
        frames = self.model.random_effects_frames(self._modes_list)
        if not self._statsmodels_spelling:
            return frames
        parts = [pd.Series(frames[name].iloc[:, 0].to_numpy(),
                           index=[f"{name}[{lab}]" for lab in frames[name].index])
                 for name in self.model.vc_order]
        return {self.model.statsmodels_group: pd.concat(parts)}

    @property
    def random_effects_frame(self) -> dict[str, pd.DataFrame]:
        return self.random_effects

    @cached_property
    def random_effects_cov(self) -> dict[str, np.ndarray]:
        """Conditional covariances of the random effects (lme4's condVar): per grouping factor
        an array (levels × k × k) in the order of ``random_effects[factor].index``."""
        cvs = self._objective.conditional_variances(self._sol)
        return {t.name: cv for t, cv in zip(self.model.terms, cvs, strict=True)}

    @cached_property
    def fittedvalues(self) -> np.ndarray:
        return self.model.fitted(self._sol.beta, self._modes_list)

    @cached_property
    def resid(self) -> np.ndarray:
        fitted = self.fittedvalues   # first: a model without rows says so here
        return self.model.y - fitted
