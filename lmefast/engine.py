"""The engine interface: everything results, inference, profiles, the bootstrap and prediction
may ask of a model's engine, and nothing else (DESIGN.md §3-4).

An engine owns the cross-products of one model structure and the kernels that evaluate the
profiled objective on them. Two implement it today, chosen from the structure (one
grouping factor, or several) where the model is built:

* ``lmefast.onefactor.OneFactorEngine`` — one grouping factor with random coefficients and
  variance components nested in its groups: Z'Z is block-diagonal by group;
* ``lmefast.multi.BlockedEngine`` — several grouping factors (crossed, nested, partially
  crossed): the blocked Cholesky with a dense trailing block.

A new engine (a sparse trailing block, weights, a GLMM's working response) implements this
class; the layers above need no change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from lmefast.errors import RowsUnavailableError
from lmefast.objective import KernelObjective, Solution
from lmefast.scaling import DesignScaling
from lmefast.structure import ThetaMap


@dataclass(frozen=True)
class CovarianceTerm:
    """One block of θ as results show it: the grouping factor, the coefficient names, which
    entries of T are free, and whether statsmodels calls it the random coefficients ('coef')
    or a variance component ('vc', with its name)."""

    factor: str
    coef_names: tuple[str, ...]
    free: np.ndarray
    role: str = "coef"
    vc_name: str = ""


class Engine(ABC):
    """θ → objective on one model structure's cross-products, and what is derived from it."""

    theta_map: ThetaMap
    #: the data source that can make another pass over the rows when they are not in memory
    source: Any = None
    #: lme4's prior weights and offset of the rows (None: none)
    weights: np.ndarray | None = None
    offset: np.ndarray | None = None
    #: statsmodels' order of the variance components (one-group spelling of crossed effects)
    vc_order: tuple[str, ...] = ()
    #: False when a term has as many random effects as observations (statsmodels' API fits it)
    identifiable: bool = True

    # -- structure -------------------------------------------------------------------------
    @property
    @abstractmethod
    def nobs(self) -> int: ...

    @property
    @abstractmethod
    def k_fe(self) -> int: ...

    #: whether the kernels make large BLAS calls (then a fit holds BLAS to its threads)
    uses_blas: bool = False
    #: the map between the user's designs and the engine's centred and scaled ones
    #: (lmefast.scaling); None: the engine works on the user's designs
    design_scaling: DesignScaling | None = None

    @property
    def scaling(self) -> DesignScaling:
        """The design map (identity when the engine works on the user's designs). θ, β, the
        objective and the cross-products are the engine's; what it reports at a solution
        (modes, conditional variances) and ``fixed_part``'s β are on the user's scale."""
        if self.design_scaling is None:
            self.design_scaling = DesignScaling.identity(self.k_fe, self.theta_map.ks)
        return self.design_scaling

    @property
    def n_levels(self) -> int:
        """Levels of the factor the kernels' loops run over (it sets the default threads)."""
        return max((len(v) for v in self.group_sizes().values()), default=0)

    @property
    def has_rows(self) -> bool:
        """Whether y, X and the random-effects designs are in memory (not for chunked data)."""
        return True

    @abstractmethod
    def covariance_terms(self) -> list[CovarianceTerm]:
        """One entry per block of θ, in θ's order."""

    @abstractmethod
    def variance_params(self) -> list[tuple[int, int, int]]:
        """statsmodels' variance parameters ψ in the order of ``params``: (term, row, col) of
        the entries of T_j T_j' (row ≥ col)."""

    @abstractmethod
    def group_sizes(self) -> dict[str, np.ndarray]:
        """Rows per level of every grouping factor (statsmodels' groups for one factor)."""

    @property
    @abstractmethod
    def crossprods(self) -> Any:
        """The cross-products (one pass over the rows, computed once)."""

    @abstractmethod
    def objective(self, reml: bool = True, n_threads: int | None = None,
                  crossprods: Any = None) -> KernelObjective:
        """The profiled objective on the model's cross-products (or on ``crossprods`` of the
        same layout: a dropped fixed-effect column, another response)."""

    # -- at a solution -----------------------------------------------------------------------
    def _modes(self, obj: KernelObjective, sol: Solution) -> Any:
        """obj.modes(sol), kept with the objective (one per fit) for the θ it was made at."""
        key = sol.theta.tobytes()
        cached = obj.__dict__.get("_modes_at")
        if cached is None or cached[0] != key:
            cached = (key, obj.modes(sol))
            obj.__dict__["_modes_at"] = cached
        return cached[1]

    @abstractmethod
    def modes_by_factor(self, obj: KernelObjective, sol: Solution) -> dict[str, pd.DataFrame]:
        """Conditional modes per grouping factor: levels × coefficients (lme4's ranef)."""

    @abstractmethod
    def condvar_by_factor(self, obj: KernelObjective, sol: Solution) -> dict[str, np.ndarray]:
        """Conditional covariances per grouping factor: levels × k × k (lme4's condVar)."""

    @abstractmethod
    def modes_by_group(self, obj: KernelObjective, sol: Solution) -> dict[Any, pd.Series]:
        """statsmodels' random_effects: group label → its conditional modes."""

    @abstractmethod
    def condvar_by_group(self, obj: KernelObjective, sol: Solution) -> dict[Any, pd.DataFrame]:
        """statsmodels' random_effects_cov: group label → conditional covariance."""

    @abstractmethod
    def fitted(self, obj: KernelObjective, sol: Solution) -> np.ndarray:
        """Xβ̂ + Zb̂ for the rows of the fit."""

    @abstractmethod
    def fixed_part(self, beta: np.ndarray) -> np.ndarray:
        """Xβ for the rows of the fit (the user's X and β: columns of ``beta`` are β's)."""

    @abstractmethod
    def response(self) -> np.ndarray:
        """y of the fit."""

    # -- inference ---------------------------------------------------------------------------
    @abstractmethod
    def without_fixed(self, j: int, value: float) -> Any:
        """Cross-products of the model with the user's β_j held at value (profiles of fixed
        effects): on the engine's design, the constraint of ``scaling.fixed_constraint``."""

    @abstractmethod
    def simulator(self, theta: np.ndarray, beta: np.ndarray, sigma: float) -> Any:
        """A bootstrap simulator: ``draws(seed, n)``, ``crossprods(draws, r)`` and
        ``random_part(rng, n)`` (n × nobs of Zb*)."""

    @abstractmethod
    def kenward_roger_traces(self, theta: np.ndarray, sigma2: float
                             ) -> tuple[np.ndarray, list[np.ndarray], dict]:
        """pbkrtest's traces tr(G_r V⁻¹ G_s V⁻¹), P_r and Q_rs over the covariance
        parameters (the free entries of every term's covariance, then σ²)."""

    @abstractmethod
    def random_prediction(self, modes: dict[str, pd.DataFrame], newdata: Any, exog_re: Any,
                          groups: Any, new_levels: str) -> np.ndarray:
        """Z b̂ for new rows (a level not in the fit contributes 0, or raises)."""

    def moment_thetas(self, zty: np.ndarray, xty: np.ndarray, yty: np.ndarray) -> np.ndarray | None:
        """The moment starts of θ for m responses on this design at once (m × n_theta; a row of
        NaN where a response has none), given their parts (Z'y in ``response_design``'s
        coordinate order, X'y, y'y: q × m, p × m, m); or None where the engine has no such
        computation (each response's objective then makes its own, ``moment_theta``)."""
        return None

    def to_data_scale(self, working: np.ndarray, offset: bool = True) -> np.ndarray:
        """Rows of the working scale (√w ·) back on the data's scale (and + o)."""
        out = working if self.weights is None else working / np.sqrt(self.weights)
        return out + self.offset if offset and self.offset is not None else out

    def with_log_weights(self, cp: Any) -> Any:
        """The cross-products with Σ log w of the prior weights (lme4's likelihood term)."""
        if self.weights is None:
            return cp
        return replace(cp, log_weights=float(np.sum(np.log(self.weights))))

    def no_rows(self, what: str) -> RowsUnavailableError:
        kind = getattr(self.source, "kind", "chunked data")
        return RowsUnavailableError(
            f"{what} is not in memory: the model was fitted from {kind} and kept only the "
            "cross-products, so what needs the rows (simulation, bootstrap, Kenward-Roger, ...) is "
            "not available; fitted values, residuals and predictions are another pass over the data "
            "(the results' fittedvalues, fitted_chunks(), predict(newdata))")
