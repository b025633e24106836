"""The engine for one grouping factor: Z'Z block-diagonal by group (DESIGN.md §2).

Random coefficients (T full or block-diagonal lower triangular) and variance components
nested in the groups (one θ each) share each group's block; per group, independently,

    L_i L_i' = Λ_i'A_iΛ_i + I,   Rzx_i = L_i⁻¹Λ_i'B_i,   rzy_i = L_i⁻¹Λ_i'c_i

from the records [A_i | B_i | c_i] of the cross-products (lmefast.crossprods). One call of the
C kernel (OneFactorKernel) evaluates the objective and its gradient from them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmefast._kernels import OneFactorKernel, modes_pass
from lmefast.crossprods import CrossProducts, compute_crossprods
from lmefast.engine import CovarianceTerm, Engine
from lmefast.errors import InferenceError, ObjectiveError, PredictionError
from lmefast.objective import KernelObjective, Solution, relative_factor, relative_factors
from lmefast.parallel import default_threads
from lmefast.spec import GroupThetaMap, ModelSpec

KR_MAX_GROUP_ROWS = 5_000          # rows in one group (an n_i × n_i inverse per group)
KR_MAX_FLOPS = 2e11                # estimated floating-point work of the Kenward-Roger pass
_KR_CHUNK_ELEMENTS = 4_000_000     # n_i × n_i entries held per chunk of groups and matrix
_INTERCEPTS = {"Intercept", "(Intercept)", "const"}


class ProfiledObjective(KernelObjective):
    """The profiled objective of one grouping factor (lmefast._kernels.OneFactorKernel)."""

    # the moment start (~70 µs of numpy) pays where an evaluation costs ~20 µs or more
    moment_start_blocks = 500

    def __init__(self, cp: CrossProducts, theta_map: GroupThetaMap, reml: bool,
                 n_threads: int | None = None) -> None:
        self.cp = cp
        self.theta_map = theta_map
        self.reml = reml
        self.dof = cp.n - cp.p if reml else cp.n
        lay = cp.layout
        rows, cols = theta_map.tril
        self.kernel = OneFactorKernel(
            cp.S, cp.s_off, lay.q_off, lay.comp, theta_map.k, cp.p, lay.qmax,
            np.ascontiguousarray(cp.XtX).ravel(), np.ascontiguousarray(cp.Xty), cp.yty,
            float(cp.n), reml, rows.astype(np.int64), cols.astype(np.int64), theta_map.n_vc,
            default_threads(lay.q_off.shape[0] - 1) if n_threads is None else n_threads)

    @property
    def n_threads(self) -> int:
        return int(self.kernel.n_threads)

    def with_crossprods(self, cp: CrossProducts) -> ProfiledObjective:
        """The same objective on cross-products that differ in the response parts only."""
        return ProfiledObjective(cp, self.theta_map, self.reml, self.n_threads)

    @property
    def n_blocks(self) -> int:
        return int(self.cp.layout.q_off.shape[0] - 1)

    def _respond(self, cp: CrossProducts) -> ProfiledObjective:
        self.kernel.set_response(cp.S, np.ascontiguousarray(cp.Xty, dtype=float), float(cp.yty))
        self.cp = cp
        return self

    def sample(self, n_blocks: int) -> tuple[ProfiledObjective, float] | None:
        m = self.n_blocks
        if m < 2 * n_blocks:
            return None
        cp, f = self.cp.sample_of_blocks(m // n_blocks)
        return ProfiledObjective(cp, self.theta_map, self.reml, self.n_threads), f

    def moment_theta(self) -> np.ndarray | None:
        """The Cholesky factor of Ψ/σ² (or √ of its diagonal for a diagonal T) from moment
        estimates on the structure's basis; a variance component: the mean relative variance
        of its coordinates. None when the groups' blocks differ or an estimate is not positive."""
        basis = self.moment_basis()
        est = None if basis is None else self.cp.moment_estimates(basis)
        rel = None if est is None else relative_factor(*est)
        return None if rel is None else self.theta_from_relative(rel[None])[0]

    def moment_basis(self) -> np.ndarray | None:
        """The symmetric basis of Ψ of the structure (ThetaMap.covariance_basis) on the first
        group's coordinates, or None."""
        tm, lay = self.theta_map, self.cp.layout
        q = int(lay.q_off[1] - lay.q_off[0]) if lay.q_off.shape[0] > 1 else 0
        return tm.covariance_basis(lay.comp[tm.k:q])

    def theta_from_relative(self, rel: np.ndarray) -> np.ndarray:
        """θ (R × n_theta) from R relative covariances Ψ/σ² (R × q × q, NaN: none): T the
        Cholesky factor of the k × k block (√ of its diagonal for a diagonal T), each variance
        component the mean of its coordinates' diagonal entries."""
        tm, lay = self.theta_map, self.cp.layout
        k, (rows, cols) = tm.k, tm.tril
        R, q = rel.shape[0], rel.shape[1]
        diag = np.einsum("rii->ri", rel)
        out = np.full((R, tm.n_theta), np.nan)
        ok = ~np.isnan(rel).reshape(R, -1).any(axis=1)
        if np.all(rows == cols):
            out[:, :rows.shape[0]] = np.sqrt(diag[:, :k][:, rows])
        elif ok.any():
            out[np.ix_(ok, np.arange(rows.shape[0]))] = np.linalg.cholesky(rel[ok][:, :k, :k])[:, rows, cols]
        comp = lay.comp[k:q]
        var = diag[:, k:]
        for c in range(tm.n_vc):
            sel = comp == c
            out[:, rows.shape[0] + c] = np.sqrt(var[:, sel].mean(axis=1)) if sel.any() else 1.0
        out[~ok] = np.nan
        return out

    def modes(self, sol: Solution) -> tuple[np.ndarray, np.ndarray]:
        """Conditional modes b (one per coordinate, offsets q_off) and conditional covariances
        σ²ΛM⁻¹Λ' (one q_i × q_i block per group, offsets a_off)."""
        cp, lay, tm = self.cp, self.cp.layout, self.theta_map
        T, tvc = tm.split(sol.theta)
        b = np.zeros(int(lay.q_off[-1]))
        cv = np.zeros(int(lay.a_off[-1]))
        status = modes_pass(cp.S, cp.s_off, lay.q_off, lay.a_off, lay.comp, tm.k, cp.p,
                            lay.qmax, T.ravel(), tvc, sol.beta, b, cv)
        if status:
            raise ObjectiveError(f"block of group {status - 1} is not positive definite")
        return b, cv * sol.sigma2


class OneFactorEngine(Engine):
    """One grouping factor. ``spec`` is a ModelSpec (rows in memory) or, for chunked data, a
    spec without rows with the cross-products and group sizes summed over the chunks.

    Prior weights w and an offset o (lme4's): the spec's rows are the working rows
    √w (y − o), √w X, √w Z, so every cross-product is Σ w a b (DESIGN.md §4); ``weights`` and
    ``offset`` turn fitted values and the response back to the data's scale."""

    def __init__(self, spec: ModelSpec, *, crossprods: CrossProducts | None = None,
                 group_sizes: np.ndarray | None = None, source: Any = None,
                 lme4_names: bool = False, weights: np.ndarray | None = None,
                 offset: np.ndarray | None = None) -> None:
        self.spec = spec
        self.weights = weights
        self.offset = offset
        self.theta_map = spec.theta_map
        self.source = source
        self.lme4_names = lme4_names
        if crossprods is not None:
            self.__dict__["crossprods"] = crossprods
        self._group_sizes = group_sizes

    # -- structure -------------------------------------------------------------------------
    @property
    def nobs(self) -> int:
        return self.spec.nobs

    @property
    def k_fe(self) -> int:
        return self.spec.k_fe

    @property
    def has_rows(self) -> bool:
        return self.source is None

    @property
    def n_groups(self) -> int:
        return self.spec.n_groups

    @property
    def n_levels(self) -> int:
        return self.spec.n_groups

    def covariance_terms(self) -> list[CovarianceTerm]:
        tm, g = self.theta_map, self.spec.group_name
        out = []
        if tm.k:
            free = np.zeros((tm.k, tm.k), dtype=bool)
            free[tm.tril] = True
            out.append(CovarianceTerm(g, tuple(tm.re_names), free))
        for name in tm.vc_names:
            out.append(CovarianceTerm(f"{g}:{name}", (name,), np.ones((1, 1), dtype=bool), "vc", name))
        return out

    def variance_params(self) -> list[tuple[int, int, int]]:
        """The free entries of the coefficients' covariance by rows (statsmodels' order), then
        one per variance component."""
        tm = self.theta_map
        rows, cols = tm.tril
        first = 1 if tm.k else 0
        pairs = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
        return [(0, i, j) for i, j in pairs] + [(first + v, 0, 0) for v in range(tm.n_vc)]

    def group_sizes(self) -> dict[str, np.ndarray]:
        if self._group_sizes is not None:
            return {self.spec.group_name: self._group_sizes}
        return {self.spec.group_name: np.bincount(self.spec.group_codes, minlength=self.n_groups)}

    @cached_property
    def crossprods(self) -> CrossProducts:
        return self._crossprods(None)

    def _crossprods(self, n_threads: int | None) -> CrossProducts:
        """The pass over the (working) rows, with Σ log w of prior weights."""
        cp = compute_crossprods(self.spec, n_threads)
        return self.with_log_weights(cp)

    def objective(self, reml: bool = True, n_threads: int | None = None,
                  crossprods: CrossProducts | None = None) -> ProfiledObjective:
        if crossprods is None and "crossprods" not in self.__dict__:
            # the first objective makes the pass over the rows, with the fit's threads
            self.__dict__["crossprods"] = self._crossprods(n_threads)
        return ProfiledObjective(self.crossprods if crossprods is None else crossprods,
                                 self.theta_map, reml, n_threads)

    # -- many responses on this design -----------------------------------------------------
    def response_design(self) -> tuple[np.ndarray, sp.csr_matrix]:
        """X and Z (sparse, n × q, columns in the cross-products' coordinate order): the
        designs that multiply a response in X'y and Z'y."""
        if not self.has_rows:
            raise self.no_rows("the design")
        spec, lay = self.spec, self.spec.layout
        n, k = spec.nobs, spec.k_re
        base = lay.q_off[spec.group_codes]
        rows = [np.repeat(np.arange(n), k), np.tile(np.arange(n), lay.vc_val.shape[0])]
        cols = [(base[:, None] + np.arange(k)).ravel(), (base[None, :] + lay.vc_coord).ravel()]
        vals = [spec.Zre.ravel(), lay.vc_val.ravel()]
        Z = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, int(lay.q_off[-1])))
        Z.eliminate_zeros()
        return spec.X, Z

    def with_response(self, zty: np.ndarray, xty: np.ndarray, yty: float) -> CrossProducts:
        """The cross-products of another response on this design (Z'y in the coordinate
        order of ``response_design``)."""
        return self.crossprods.with_response(zty, xty, yty)

    def moment_thetas(self, zty: np.ndarray, xty: np.ndarray, yty: np.ndarray) -> np.ndarray | None:
        obj = self.objective(True, 1)
        basis = obj.moment_basis()
        est = None if basis is None else self.crossprods.moment_estimates_many(basis, zty, xty, yty)
        return None if est is None else obj.theta_from_relative(relative_factors(*est))

    def weighted_crossprods(self, y: np.ndarray, weights: np.ndarray) -> CrossProducts:
        """The cross-products of response y with prior weights w (all > 0) on this design's
        rows, which carry no weights of their own: one pass over √w y, √w X, √w Z."""
        spec, s = self.spec, np.sqrt(weights)
        rows = replace(spec, y=np.ascontiguousarray(y * s), X=np.ascontiguousarray(spec.X * s[:, None]),
                       Zre=np.ascontiguousarray(spec.Zre * s[:, None]),
                       layout=replace(spec.layout, vc_val=np.ascontiguousarray(spec.layout.vc_val * s)))
        return replace(compute_crossprods(rows, 1), log_weights=float(np.sum(np.log(weights))))

    def _user_modes(self, obj: ProfiledObjective, sol: Solution) -> tuple[np.ndarray, np.ndarray]:
        """The modes and conditional covariances on the user's scale: per group
        D = blockdiag(C, the components' factors), b = D b̃, D V D' (lmefast.scaling)."""
        b, cv = self._modes(obj, sol)
        sc = self.scaling
        if sc.is_identity:
            return b, cv
        lay, k = self.spec.layout, self.theta_map.k
        q = np.diff(lay.q_off)
        local = np.arange(b.shape[0]) - np.repeat(lay.q_off[:-1], q)
        factors = np.array([C[0, 0] for C in sc.terms[1 if k else 0:]] + [1.0])
        d = np.where(local >= k, factors[np.where(local >= k, lay.comp, -1)], 1.0)
        b = b * d
        cv = cv.copy()
        C = sc.terms[0] if k else None
        if k:
            idx = lay.q_off[:-1, None] + np.arange(k)
            b[idx] = b[idx] @ C.T
        for qi in np.unique(q):
            gs = np.nonzero(q == qi)[0]
            qi = int(qi)
            pos = lay.a_off[gs][:, None] + np.arange(qi * qi)[None, :]
            blocks = cv[pos].reshape(-1, qi, qi)
            dg = d[lay.q_off[gs][:, None] + np.arange(qi)[None, :]]
            blocks = blocks * dg[:, :, None] * dg[:, None, :]
            if k:
                blocks[:, :k, :] = np.einsum("ab,gbc->gac", C, blocks[:, :k, :])
                blocks[:, :, :k] = np.einsum("gab,cb->gac", blocks[:, :, :k], C)
            cv[pos] = blocks.reshape(gs.shape[0], -1)
        return b, cv

    # -- at a solution -----------------------------------------------------------------------
    def coefficient_modes(self, obj: ProfiledObjective, sol: Solution) -> pd.DataFrame:
        """Modes of the random coefficients, one row per group (k columns)."""
        lay, k = self.spec.layout, self.theta_map.k
        b, _ = self._user_modes(obj, sol)
        idx = lay.q_off[:-1, None] + np.arange(k)
        return pd.DataFrame(b[idx], index=pd.Index(self.spec.group_labels, name=self.spec.group_name),
                            columns=list(self.theta_map.re_names))

    def modes_by_factor(self, obj: ProfiledObjective, sol: Solution) -> dict[str, pd.DataFrame]:
        """The random coefficients of the groups; a variance component of one column (lme4's
        (0 + x | g) term, fitted out of core) adds a column (0 where a group has no entry)."""
        frame = self.coefficient_modes(obj, sol)
        tm, lay = self.theta_map, self.spec.layout
        if tm.n_vc:
            b, _ = self._user_modes(obj, sol)
            for v, name in enumerate(tm.vc_names):
                col = np.zeros(self.n_groups)
                coords = np.nonzero(lay.comp == v)[0]
                coords = coords[coords >= 0]
                group = np.searchsorted(lay.q_off, coords, side="right") - 1
                is_vc = coords - lay.q_off[group] >= tm.k
                col[group[is_vc]] = b[coords[is_vc]]
                frame[name] = col
        return {self.spec.group_name: frame}

    def condvar_by_factor(self, obj: ProfiledObjective, sol: Solution) -> dict[str, np.ndarray]:
        _, cv = self._user_modes(obj, sol)
        lay, k = self.spec.layout, self.theta_map.k
        q = np.diff(lay.q_off)
        idx = (lay.a_off[:-1, None, None] + np.arange(k)[None, :, None] * q[:, None, None]
               + np.arange(k)[None, None, :])
        return {self.spec.group_name: cv[idx]}

    def modes_by_group(self, obj: ProfiledObjective, sol: Solution) -> dict[Any, pd.Series]:
        b, _ = self._user_modes(obj, sol)
        lay, spec = self.spec.layout, self.spec
        return {lab: pd.Series(b[lay.q_off[g]:lay.q_off[g + 1]], index=spec.coord_names(g))
                for g, lab in enumerate(spec.group_labels.tolist())}

    def condvar_by_group(self, obj: ProfiledObjective, sol: Solution) -> dict[Any, pd.DataFrame]:
        _, cv = self._user_modes(obj, sol)
        lay, spec = self.spec.layout, self.spec
        out = {}
        for g, lab in enumerate(spec.group_labels.tolist()):
            q = int(lay.q_off[g + 1] - lay.q_off[g])
            names = spec.coord_names(g)
            out[lab] = pd.DataFrame(cv[lay.a_off[g]:lay.a_off[g + 1]].reshape(q, q),
                                    index=names, columns=names)
        return out

    def fitted(self, obj: ProfiledObjective, sol: Solution) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the fitted values")
        spec, lay = self.spec, self.spec.layout
        b, _ = self._modes(obj, sol)
        codes = spec.group_codes
        fit = spec.X @ sol.beta
        k = self.theta_map.k
        if k:
            fit += np.einsum("ij,ij->i", spec.Zre, b[lay.q_off[codes][:, None] + np.arange(k)])
        if lay.vc_val.shape[0]:
            base = lay.q_off[codes]
            fit += np.sum(lay.vc_val * b[base[None, :] + lay.vc_coord], axis=0)
        return self.to_data_scale(fit)

    def fixed_part(self, beta: np.ndarray) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the fixed-effects design")
        return self.to_data_scale(self.spec.X @ self.scaling.beta_internal(beta), offset=False)

    def response(self) -> np.ndarray:
        if not self.has_rows:
            raise self.no_rows("the response")
        return self.to_data_scale(self.spec.y)

    # -- inference ---------------------------------------------------------------------------
    def without_fixed(self, j: int, value: float) -> CrossProducts:
        k, v, N, d = self.scaling.fixed_constraint(j, value)
        if N is None:
            return self.crossprods.without_fixed(k, v)
        return self.crossprods.with_fixed_map(N, d)

    def simulator(self, theta: np.ndarray, beta: np.ndarray, sigma: float) -> YPartSimulator:
        if not self.has_rows:
            raise self.no_rows("the design")
        return YPartSimulator(self, theta, beta, sigma)

    def design_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows sorted by group: (order, position in group, Z padded per row (n × qmax), sizes)."""
        spec = self.spec
        lay, codes = spec.layout, spec.group_codes
        n, m, k = spec.nobs, spec.n_groups, spec.k_re
        Z = np.zeros((n, lay.qmax))
        Z[:, :k] = spec.Zre
        for e in range(lay.vc_val.shape[0]):
            val = lay.vc_val[e]
            nz = val != 0
            Z[np.nonzero(nz)[0], lay.vc_coord[e, nz]] += val[nz]
        sizes = np.bincount(codes, minlength=m)
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n) - starts[codes[order]]
        return order, pos, Z, sizes

    def kenward_roger_traces(self, theta: np.ndarray, sigma2: float
                             ) -> tuple[np.ndarray, list[np.ndarray], dict]:
        """V is block-diagonal: every trace and product pbkrtest forms is a sum over groups of
        n_i × n_i products, taken for chunks of groups at a time. The covariance parameters
        are the free entries of the coefficients' covariance (its pattern: a `||` term has no
        covariances), one per variance component, and σ²."""
        if not self.has_rows:
            raise self.no_rows("the design")
        # prior weights: on the working rows (√w X, √w Z, errors σ²I) V is S(ZΣZ' + σ²W⁻¹)S,
        # S = diag(√w), and every trace and X'V⁻¹…V⁻¹X below is unchanged by S: these are the
        # weighted model's, with ∂V/∂σ² = W⁻¹
        spec = self.spec
        lay = spec.layout
        codes = spec.group_codes
        tm = self.theta_map
        m, n, p, k = spec.n_groups, spec.nobs, spec.k_fe, tm.k
        sizes = np.bincount(codes, minlength=m)
        nmax = int(sizes.max())
        pats = []
        for r, c in sorted(zip(*(a.tolist() for a in tm.tril), strict=True)):
            D = np.zeros((k, k))
            D[r, c] = D[c, r] = 1.0
            pats.append(D)
        vcs = np.arange(tm.n_vc)
        R = len(pats) + tm.n_vc + 1
        flops = float(np.sum(sizes.astype(float) ** 3)) * 4 + R * R * float(
            np.sum(sizes.astype(float) ** 2 * (sizes + p)))
        if nmax > KR_MAX_GROUP_ROWS or flops > KR_MAX_FLOPS:
            raise InferenceError(
                f"Kenward-Roger needs per-group {nmax} × {nmax} inverses and about {flops:.2g} "
                f"floating-point operations (O(Σ n_i³ + R² Σ n_i²(n_i + p)), R = {R} covariance "
                f"parameters); the limits are {KR_MAX_GROUP_ROWS} rows per group and {KR_MAX_FLOPS:.0e} "
                "operations: use ddf='satterthwaite' (cost independent of the number of rows)")
        T, tvc = tm.split(theta)
        cov_k = sigma2 * (T @ T.T)
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n) - starts[codes[order]]
        q = np.diff(lay.q_off)
        qmax = int(q.max())
        ne = lay.vc_val.shape[0]
        Ktr = np.zeros((R, R))
        P = [np.zeros((p, p)) for _ in range(R)]
        Q = {(r, s): np.zeros((p, p)) for r in range(R) for s in range(r, R)}
        per_group = nmax * nmax * (R + 4) + nmax * qmax
        chunk = max(1, _KR_CHUNK_ELEMENTS // max(per_group, 1))
        for g0 in range(0, m, chunk):
            g1 = min(m, g0 + chunk)
            mc = g1 - g0
            rows_c = order[starts[g0]:starts[g1]]
            gi = codes[rows_c] - g0
            pi = pos[rows_c]
            Z = np.zeros((mc, nmax, qmax))
            X = np.zeros((mc, nmax, p))
            mask = np.zeros((mc, nmax))
            mask[gi, pi] = 1.0
            X[gi, pi] = spec.X[rows_c]
            if k:
                Z[gi, pi, :k] = spec.Zre[rows_c]
            for e in range(ne):
                val = lay.vc_val[e, rows_c]
                nz = val != 0
                Z[gi[nz], pi[nz], lay.vc_coord[e, rows_c][nz]] = val[nz]
            # the variance component of each (group, coordinate); −1 for the k coefficients/padding
            local = np.arange(qmax)
            valid = (local[None, :] >= k) & (local[None, :] < q[g0:g1, None])
            gidx = np.minimum(lay.q_off[g0:g1, None] + local[None, :], lay.comp.shape[0] - 1)
            comp = np.where(valid, lay.comp[gidx], -1)
            Psi = np.zeros((mc, qmax, qmax))
            Psi[:, :k, :k] = cov_k
            diag_vc = np.where(comp >= 0, sigma2 * np.concatenate([tvc**2, [0.0]])[comp], 0.0)
            idx = np.arange(qmax)
            Psi[:, idx, idx] += diag_vc
            V = Z @ Psi @ Z.transpose(0, 2, 1)
            ii = np.arange(nmax)
            V[:, ii, ii] += sigma2 * mask + (1.0 - mask)
            Vi = np.linalg.inv(V)
            Vi[:, ii, ii] -= (1.0 - mask)  # padded rows: no contribution
            Vi *= mask[:, :, None] * mask[:, None, :]
            G = []
            for D in pats:
                Dq = np.zeros((qmax, qmax))
                Dq[:k, :k] = D
                G.append(Z @ Dq @ Z.transpose(0, 2, 1))
            for c in vcs:
                w = (comp == c).astype(float)
                G.append((Z * w[:, None, :]) @ Z.transpose(0, 2, 1))
            G.append(None)  # residual: the identity on the group's rows
            H = [Vi if Gr is None else Gr @ Vi for Gr in G]
            TT = Vi @ X
            HX = [Hr @ X for Hr in H]
            ViHX = [Vi @ Or for Or in HX]
            for r in range(R):
                P[r] -= np.einsum("gia,gib->ab", HX[r], TT)
                for s in range(r, R):
                    Ktr[r, s] += np.einsum("gij,gji->", H[r], H[s])
                    Q[(r, s)] += np.einsum("gia,gib->ab", HX[r], ViHX[s])
        return Ktr, P, Q

    def random_prediction(self, modes: dict[str, pd.DataFrame], newdata: Any, exog_re: Any,
                          groups: Any, new_levels: str) -> np.ndarray:
        from lmefast.design import design, level_index

        spec = self.spec
        if self.theta_map.n_vc:
            raise PredictionError("conditional predictions on new data are not implemented for models "
                                  "with variance components; use include_random=False")
        gname = spec.group_name
        re_names = list(self.theta_map.re_names)
        if newdata is not None:
            if gname not in newdata.columns:
                raise PredictionError(f"newdata is missing the grouping column {gname!r}")
            Z = design(newdata, re_names, _INTERCEPTS | {gname}, "random effects")
            g = newdata[gname].to_numpy()
        else:
            if groups is None:
                raise PredictionError("groups is required with exog when include_random=True")
            g = np.asarray(groups)
            n = len(g)
            Z = np.ones((n, 1)) if exog_re is None else np.atleast_2d(np.asarray(exog_re, dtype=float))
            if Z.shape[1] != self.theta_map.k:
                raise PredictionError(f"exog_re must have {self.theta_map.k} columns {re_names}, "
                                      f"got {Z.shape[1]}")
        frame = modes[gname][re_names]
        idx = level_index(np.asarray(frame.index), g)
        new = idx < 0
        if new.any() and new_levels == "error":
            raise PredictionError(f"group level(s) {sorted({str(v) for v in np.asarray(g)[new]})[:10]} were "
                                  "not in the fit (pass new_levels='population' for population predictions)")
        B = frame.to_numpy()
        contrib = np.einsum("ij,ij->i", Z, B[np.where(new, 0, idx)])
        return np.where(new, 0.0, contrib)


@dataclass
class Draw:
    """One batch of simulated y-parts (R replicates)."""

    b: np.ndarray        # R × m × qmax, random effects (0 in padded coordinates)
    z: np.ndarray        # R × m × D, standard normals (0 where G_i has no rank)
    chi2: np.ndarray     # R, the χ²_{n − Σr_i} draws
    c: np.ndarray        # R × m × qmax, Z_i'y*
    Xty: np.ndarray      # R × p
    yty: np.ndarray      # R


class YPartSimulator:
    """Draws (Z'y*, X'y*, y*'y*) for responses simulated from a fit, exactly in distribution
    (lmefast.bootstrap's module docstring): per group, with M_i = [Z_i X_i] and
    G_i = M_i'M_i = F_iF_i', M_i'ε_i = σF_iz_i, and one χ² for the rest of ε'ε."""

    def __init__(self, engine: OneFactorEngine, theta: np.ndarray, beta: np.ndarray,
                 sigma: float) -> None:
        spec = engine.spec
        self.engine = engine
        cp = engine.crossprods
        self.cp = cp
        lay = cp.layout
        m, p, k = spec.n_groups, spec.k_fe, spec.k_re
        q = np.diff(lay.q_off)
        qmax = lay.qmax
        self.m, self.p, self.qmax, self.q = m, p, qmax, q
        D = qmax + p
        self.D = D
        loc = np.arange(qmax)
        valid = loc[None, :] < q[:, None]
        self.valid = valid
        cstart = cp.s_off[:-1] + q * q + q * p
        self.cpos = np.where(valid, cstart[:, None] + loc[None, :], -1)
        A, B = cp.padded_blocks()
        self.A, self.B = A, B
        codes = spec.group_codes
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=m))])[:-1]
        Xs = spec.X[order]
        XX = np.add.reduceat(Xs[:, :, None] * Xs[:, None, :], starts, axis=0) if p else np.zeros((m, 0, 0))
        G = np.zeros((m, D, D))
        G[:, :qmax, :qmax] = A
        G[:, :qmax, qmax:] = B
        G[:, qmax:, :qmax] = B.transpose(0, 2, 1)
        G[:, qmax:, qmax:] = XX
        self.G = G
        lam, U = np.linalg.eigh(G)
        tol = np.finfo(float).eps * D * 100 * np.maximum(lam.max(axis=1, keepdims=True), 1e-300)
        keep = lam > tol
        self.keep = keep
        self.U = U * keep[:, None, :]
        self.sqrt_lam = np.where(keep, np.sqrt(np.where(keep, lam, 1.0)), 0.0)
        self.F = self.U * self.sqrt_lam[:, None, :]
        self.chi_df = int(spec.nobs - keep.sum())
        self.beta = np.asarray(beta, dtype=float).copy()
        self.sigma = float(sigma)
        T, tvc = spec.theta_map.split(theta)
        Lam = np.zeros((m, qmax, qmax))
        Lam[:, :k, :k] = T
        comp = np.where(valid & (loc[None, :] >= k),
                        lay.comp[np.minimum(lay.q_off[:-1, None] + loc[None, :], lay.comp.shape[0] - 1)], -1)
        dvc = np.where(comp >= 0, np.concatenate([tvc, [0.0]])[comp], 0.0)
        Lam[:, loc, loc] += dvc
        self.Lam = Lam
        self.Bbeta = B @ self.beta if p else np.zeros((m, qmax))

    def draws(self, seed: int | np.random.Generator | None, n: int) -> Draw:
        return self.draw(np.random.default_rng(seed), n)

    def draw(self, rng: np.random.Generator, R: int) -> Draw:
        m, qmax, D, p = self.m, self.qmax, self.D, self.p
        s = self.sigma
        u = rng.standard_normal((R, m, qmax)) * self.valid
        b = s * np.einsum("gij,rgj->rgi", self.Lam, u)
        z = rng.standard_normal((R, m, D)) * self.keep
        w = s * np.einsum("gij,rgj->rgi", self.F, z)
        chi2 = rng.chisquare(self.chi_df, R) if self.chi_df > 0 else np.zeros(R)
        c = self.Bbeta[None] + np.einsum("gij,rgj->rgi", self.A, b) + w[:, :, :qmax]
        c *= self.valid
        XtXb = self.cp.XtX @ self.beta
        Xty = XtXb[None, :] + np.einsum("gia,rgi->ra", self.B, b) + w[:, :, qmax:].sum(axis=1)
        v = np.concatenate([b, np.broadcast_to(self.beta, (R, m, p))], axis=2)
        mumu = np.einsum("rgi,gij,rgj->r", v, self.G, v)
        yty = mumu + 2 * np.einsum("rgi,rgi->r", v, w) + s * s * (np.einsum("rgi,rgi->r", z, z) + chi2)
        return Draw(b=b, z=z, chi2=chi2, c=c, Xty=Xty, yty=yty)

    def crossprods(self, d: Draw, r: int) -> CrossProducts:
        """The cross-products of replicate r of a draw."""
        S = self.cp.S.copy()
        S[self.cpos[self.valid]] = d.c[r][self.valid]
        return replace(self.cp, S=S, Xty=d.Xty[r].copy(), yty=float(d.yty[r]))

    def random_part(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n × nobs: Zb* for new random effects b* ~ N(0, σ̂²ΛΛ') (rows in the data's order)."""
        spec = self.engine.spec
        _, _, Z, _ = self.engine.design_blocks()
        u = rng.standard_normal((n, spec.n_groups, self.qmax)) * self.valid
        b = self.sigma * np.einsum("gij,rgj->rgi", self.Lam, u)
        return np.stack([np.einsum("ij,ij->i", Z, b[r][spec.group_codes]) for r in range(n)])

    def response(self, d: Draw, r: int, rng: np.random.Generator) -> np.ndarray:
        """A response vector (original row order) whose cross-products are exactly those of
        replicate r: y* = Xβ̂ + Zb* + ε*, with ε* = σ M_i U_i λ_i^{-1/2} z_i plus a part
        orthogonal to the columns of M_i carrying the χ² draw. For tests and inspection."""
        spec = self.engine.spec
        _, _, Z, _ = self.engine.design_blocks()
        codes = spec.group_codes
        n = spec.nobs
        M = np.concatenate([Z, spec.X], axis=1)                        # n × D
        inv_sqrt = np.where(self.keep, 1.0 / np.where(self.keep, self.sqrt_lam, 1.0), 0.0)
        coef = np.einsum("gij,gj->gi", self.U, inv_sqrt * d.z[r])  # m × D: U λ^{-1/2} z
        eps = self.sigma * np.einsum("ij,ij->i", M, coef[codes])
        xi = rng.standard_normal(n)
        Mxi = np.zeros((self.m, self.D))
        np.add.at(Mxi, codes, M * xi[:, None])
        Gp = np.einsum("gij,gj,gkj->gik", self.U, inv_sqrt ** 2, self.U)
        proj = np.einsum("ij,ij->i", M, np.einsum("gij,gj->gi", Gp, Mxi)[codes])
        u = xi - proj
        nu = float(u @ u)
        if self.chi_df > 0 and nu > 0:
            u *= self.sigma * np.sqrt(d.chi2[r] / nu)
        else:
            u[:] = 0.0
        mu = spec.X @ self.beta + np.einsum("ij,ij->i", Z, d.b[r][codes])
        return mu + eps + u
