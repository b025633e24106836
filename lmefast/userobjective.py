"""The profiled objective on the user's scale: θ, β and the REML criterion of the user's
designs, evaluated by the engine's objective on its centred and scaled designs
(lmefast.scaling). ``MixedLM.objective`` and ``MixedLM.loglike`` give this one; fitting and
inference use the engine's own.

    θ̃ = pack(tri(C_j⁻¹ T_j(θ))),   β = S β̃,   Lx = tri(S⁻ᵀ L̃x),
    objective = objectivẽ + reml_offset,   ∂/∂θ = Jᵀ ∂/∂θ̃,  J = ∂θ̃/∂θ

J of tri(A) (A A' = L L'): dL = L Φ(L⁻¹ d(AA') L⁻ᵀ), Φ the lower triangle with half the
diagonal; where L is singular (θ on a boundary), central differences.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from lmefast.objective import Solution
from lmefast.scaling import DesignScaling, tri


def _tri_jacobian(C: np.ndarray, T: np.ndarray, pattern: tuple[np.ndarray, np.ndarray]
                  ) -> np.ndarray:
    """∂ pack(tri(C⁻¹T)) / ∂ pack(T) for one term (both packed by ``pattern``)."""
    k = T.shape[0]
    n = pattern[0].shape[0]
    Cinv = np.linalg.inv(C)
    A = Cinv @ T
    L = tri(A)
    J = np.empty((n, n))
    if np.all(np.abs(np.diag(L)) > 1e-12 * max(1.0, np.max(np.abs(L)))):
        Linv = np.linalg.inv(L)
        for e, (r, c) in enumerate(zip(*pattern, strict=True)):
            dA = np.zeros((k, k))
            dA[:, c] = Cinv[:, r]
            dS = dA @ A.T + A @ dA.T
            W = Linv @ dS @ Linv.T
            Phi = np.tril(W, -1) + 0.5 * np.diag(np.diag(W))
            J[:, e] = (L @ Phi)[pattern]
        return J
    for e, (r, c) in enumerate(zip(*pattern, strict=True)):
        h = 1e-7 * max(1.0, abs(T[r, c]))
        up, dn = T.copy(), T.copy()
        up[r, c] += h
        dn[r, c] -= h
        J[:, e] = (tri(Cinv @ up)[pattern] - tri(Cinv @ dn)[pattern]) / (2 * h)
    return J


class UserScaleObjective:
    """θ on the user's scale → the engine's objective (see the module docstring)."""

    def __init__(self, inner: Any, scaling: DesignScaling) -> None:
        self.inner = inner
        self.scaling = scaling
        self.offset = scaling.reml_offset() if inner.reml else 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _jacobian(self, theta: np.ndarray) -> np.ndarray:
        tm = self.inner.theta_map
        J = np.zeros((tm.n_theta, tm.n_theta))
        for j, (C, T, pattern) in enumerate(zip(self.scaling.terms, tm.Ts(theta), tm.patterns,
                                                strict=True)):
            lo, hi = tm.offsets[j], tm.offsets[j + 1]
            J[lo:hi, lo:hi] = _tri_jacobian(C, T, pattern)
        return J

    def solve(self, theta: np.ndarray, want_grad: bool = False) -> Solution:
        theta = np.array(theta, dtype=float)
        sc = self.scaling
        sol = self.inner.solve(sc.theta_internal(self.inner.theta_map, theta), want_grad)
        grad = None if sol.grad is None else self._jacobian(theta).T @ sol.grad
        Lx = tri(np.linalg.solve(sc.fixed.T, sol.Lx)) if sol.Lx.size else sol.Lx
        return replace(sol, theta=theta, objective=sol.objective + self.offset,
                       beta=sc.beta(sol.beta), Lx=Lx, grad=grad)

    def __call__(self, theta: np.ndarray) -> float:
        return self.inner(self.scaling.theta_internal(self.inner.theta_map, theta)) + self.offset

    def gradient(self, sol: Solution) -> np.ndarray:
        if sol.grad is not None:
            return sol.grad
        return self.solve(sol.theta, want_grad=True).grad

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        sol = self.solve(theta, want_grad=True)
        return sol.objective, sol.grad
