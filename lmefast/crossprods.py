"""Cross-products: everything the profiled objective needs, from one pass over the rows."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from lmefast._crossprods import accumulate, column_moments, column_sums
from lmefast.parallel import check_threads, default_threads
from lmefast.spec import BlockLayout, ModelSpec


@dataclass(frozen=True)
class CrossProducts:
    """Per-group records [A_i | B_i | c_i] in one flat array S at offsets s_off (A_i = Z_i'Z_i,
    B_i = Z_i'X_i, c_i = Z_i'y_i, row-major) and the global X'X, X'y, y'y, n. Sums over
    rows: mergeable across chunks."""

    S: np.ndarray
    s_off: np.ndarray
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float
    n: int
    layout: BlockLayout
    #: Σ log wᵢ of prior weights (lme4 subtracts it from the deviance; 0 without weights)
    log_weights: float = 0.0

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])

    def records(self, q: int, groups: np.ndarray) -> np.ndarray:
        """The records of these groups (all with q coordinates), one row each."""
        return self.S[self.s_off[groups][:, None] + np.arange(q * (q + self.p + 1))[None, :]]

    def padded_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """A_i (m × qmax × qmax) and B_i (m × qmax × p), zero-padded."""
        q = np.diff(self.layout.q_off)
        m, qmax, p = q.shape[0], self.layout.qmax, self.p
        A = np.zeros((m, qmax, qmax))
        B = np.zeros((m, qmax, p))
        for qi in np.unique(q):
            gs = np.nonzero(q == qi)[0]
            qi = int(qi)
            rec = self.records(qi, gs)
            A[gs, :qi, :qi] = rec[:, :qi * qi].reshape(-1, qi, qi)
            B[gs, :qi, :] = rec[:, qi * qi:qi * qi + qi * p].reshape(-1, qi, p)
        return A, B

    @cached_property
    def response_positions(self) -> np.ndarray:
        """Where each coordinate's entry of Z'y sits in S (coordinates in the layout's order:
        group g owns q_off[g]:q_off[g+1])."""
        q_off, p = self.layout.q_off, self.p
        q = np.diff(q_off)
        group = np.repeat(np.arange(q.shape[0]), q)
        local = np.arange(int(q_off[-1])) - q_off[group]
        return self.s_off[group] + q[group] * (q[group] + p) + local

    def with_response(self, zty: np.ndarray, xty: np.ndarray, yty: float) -> CrossProducts:
        """The same design with another response: Z'y (one entry per coordinate, in the
        layout's order), X'y and y'y replaced."""
        S = self.S.copy()
        S[self.response_positions] = zty
        return replace(self, S=S, Xty=np.ascontiguousarray(xty, dtype=float), yty=float(yty))

    def sample_of_blocks(self, stride: int) -> tuple[CrossProducts, float]:
        """The cross-products of every ``stride``-th group, with X'X, X'y, y'y, n and Σ log w
        scaled by the fraction f of groups kept: an objective of the same shape whose
        curvature is about f times the full one's (each group adds its own terms; the
        profiled terms are sums over rows). For a start of the optimiser, not for estimates.
        Returns (the sample, f)."""
        lay, p = self.layout, self.p
        m = lay.q_off.shape[0] - 1
        groups = np.arange(0, m, max(1, int(stride)))
        f = groups.shape[0] / m
        q = np.diff(lay.q_off)[groups]
        size = q * (q + p + 1)
        s_off = np.zeros(groups.shape[0] + 1, dtype=np.int64)
        np.cumsum(size, out=s_off[1:])
        S = self.S[np.repeat(self.s_off[groups] - s_off[:-1], size) + np.arange(int(s_off[-1]))]
        q_off = np.zeros(groups.shape[0] + 1, dtype=np.int64)
        np.cumsum(q, out=q_off[1:])
        coord = np.repeat(lay.q_off[groups] - q_off[:-1], q) + np.arange(int(q_off[-1]))
        a_off = np.zeros(groups.shape[0] + 1, dtype=np.int64)
        np.cumsum(q * q, out=a_off[1:])
        ne = lay.vc_coord.shape[0]
        layout = BlockLayout(q_off, a_off, lay.comp[coord], lay.col[coord],
                             np.zeros((ne, 0), dtype=np.int64), np.zeros((ne, 0)))
        return CrossProducts(S=S, s_off=s_off, XtX=self.XtX * f, Xty=self.Xty * f,
                             yty=self.yty * f, n=max(int(round(self.n * f)), p + 1),
                             layout=layout, log_weights=self.log_weights * f), f

    def moment_estimates(self, basis: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Moment estimates (Ψ, σ²) for one grouping factor whose groups all have the same q
        coordinates (random coefficients, then variance-component levels in the same order), with
        Ψ = Σ_b ψ_b E_b on the structure's symmetric basis (`basis`, one q × q matrix a row),
        from OLS residual sums u_i = c_i − B_i β̂ and E[Z_i'r r'Z_i] = A_i Ψ A_i + σ² A_i,
        E[r'r] = Σ_i tr(Z_i Ψ Z_i') + n σ², projected on the basis:

            Σ_b ψ_b Σ_i tr(E_a A_i E_b A_i) + σ² Σ_i tr(E_a A_i) = Σ_i u_i'E_a u_i
            Σ_b ψ_b Σ_i tr(E_b A_i) + n σ² = r'r

        (a start, not an estimate: the O(p/m) correction for the estimated β̂ is left out).
        The one-response case of ``moment_estimates_many``."""
        q_all = np.diff(self.layout.q_off)
        if q_all.shape[0] == 0 or np.any(q_all != q_all[0]):
            return None
        q, p = int(q_all[0]), self.p
        c = self.S.reshape(q_all.shape[0], -1)[:, q * q + q * p:]       # c_i of every record
        est = self.moment_estimates_many(basis, c.reshape(-1, 1), self.Xty[:, None],
                                         np.array([self.yty]))
        return None if est is None else (est[0][0], float(est[1][0]))

    def moment_estimates_many(self, basis: np.ndarray, zty: np.ndarray, xty: np.ndarray,
                              yty: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``moment_estimates`` for R responses on this design at once, given their parts
        (Z'y in the layout's coordinate order: q_total × R, X'y: p × R, y'y: R): the matrix of
        the linear system is the design's, its right-hand sides the responses'. Returns
        (Ψ: R × q × q, σ²: R), or None where moment_estimates has none for the design."""
        q_all = np.diff(self.layout.q_off)
        m, p = q_all.shape[0], self.p
        if m == 0 or np.any(q_all != q_all[0]):
            return None
        q = int(q_all[0])
        qq, nb, R = q * q, basis.shape[0], zty.shape[1]
        if basis.shape[1] != qq:
            return None
        comp = self.layout.comp
        if q > 1 and comp.any() and np.any(comp.reshape(m, q) != comp[:q]):   # all 0: alike
            return None
        try:
            beta = np.linalg.solve(self.XtX, xty)
        except np.linalg.LinAlgError:
            return None
        rec = self.S.reshape(m, qq + q * p + q)
        A = rec[:, :qq]
        # u_i = c_i − B_i β̂, one coordinate a of every group at a time (B's rows a are strided
        # views of the records: no copy of B)
        u = np.array(zty, dtype=float).reshape(m, q, R)
        for a in range(q):
            u[:, a, :] -= rec[:, qq + a * p:qq + (a + 1) * p] @ beta
        rr = yty - 2.0 * np.einsum("lr,lr->r", beta, xty) + np.einsum("lr,lr->r", beta, self.XtX @ beta)
        K = (A.T @ A).reshape(q, q, q, q).transpose(0, 2, 1, 3).reshape(qq, qq)   # Σ A_i ⊗ A_i
        M = np.empty((nb + 1, nb + 1))
        M[:nb, :nb] = basis @ K @ basis.T
        M[:nb, nb] = M[nb, :nb] = basis @ (column_sums(A) if qq > 1 else A.sum(axis=0))
        M[nb, nb] = self.n
        if R == 1:
            u1 = u.reshape(m, q)
            uu = (u1.T @ u1).reshape(qq, 1)
        else:
            uu = np.einsum("iar,ibr->abr", u, u).reshape(qq, R)
        try:
            sol = np.linalg.solve(M, np.vstack([basis @ uu, rr[None, :]]))
        except np.linalg.LinAlgError:
            return None
        return (sol[:nb].T @ basis).reshape(R, q, q), sol[nb]

    def keep_fixed(self, keep: np.ndarray) -> CrossProducts:
        """The cross-products with only the ``keep`` columns of X (a dropped column, a
        rank-deficient design)."""
        return self._with_columns(np.asarray(keep, dtype=np.int64), None, 0.0)

    def without_fixed(self, j: int, value: float) -> CrossProducts:
        """β_j held at value: column j of X removed and value · x_j taken from the response
        (Z'y − value Z'x_j, X'y − value X'x_j, y'y − 2 value x_j'y + value² x_j'x_j)."""
        keep = np.array([c for c in range(self.p) if c != j], dtype=np.int64)
        return self._with_columns(keep, j, float(value))

    def with_fixed_map(self, N: np.ndarray, d: np.ndarray) -> CrossProducts:
        """β = d + Nγ: the design X N and the response y − X d (a linear constraint on β, e.g.
        a fixed effect held at a value on another scale of the columns)."""
        S, s_new = self._map_fixed(N.shape[1], lambda B, c: (B @ N, c - B @ d))
        XtX, Xty = self.XtX, self.Xty
        Xty_d = Xty - XtX @ d
        return CrossProducts(S=S, s_off=s_new, XtX=np.ascontiguousarray(N.T @ XtX @ N),
                             Xty=np.ascontiguousarray(N.T @ Xty_d),
                             yty=float(self.yty - 2 * d @ Xty + d @ XtX @ d), n=self.n,
                             layout=self.layout, log_weights=self.log_weights)

    def _with_columns(self, keep: np.ndarray, j: int | None, value: float) -> CrossProducts:
        def part(B: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return B[:, :, keep], (c if j is None else c - value * B[:, :, j])

        S, s_new = self._map_fixed(keep.shape[0], part)
        XtX, Xty, yty = self.XtX, self.Xty, self.yty
        if j is not None:
            Xty = Xty - value * XtX[:, j]
            yty = yty - 2 * value * self.Xty[j] + value * value * XtX[j, j]
        return CrossProducts(S=S, s_off=s_new, XtX=np.ascontiguousarray(XtX[np.ix_(keep, keep)]),
                             Xty=np.ascontiguousarray(Xty[keep]), yty=float(yty), n=self.n,
                             layout=self.layout, log_weights=self.log_weights)

    def _map_fixed(self, r: int, part: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Records with r fixed-effects columns: each group's (B_i, c_i) → part(B_i, c_i), for all
        groups of one size at once (B: groups × q × p, c: groups × q); A_i unchanged. Returns
        (S, s_off)."""
        lay, p = self.layout, self.p
        q = np.diff(lay.q_off)
        s_new = record_offsets(lay, r)
        S = np.empty(int(s_new[-1]))
        for qi in np.unique(q):
            gs = np.nonzero(q == qi)[0]
            qi = int(qi)
            rec = self.records(qi, gs)
            B = rec[:, qi * qi:qi * qi + qi * p].reshape(-1, qi, p)
            B_new, c_new = part(B, rec[:, qi * qi + qi * p:])
            new = np.concatenate([rec[:, :qi * qi], B_new.reshape(gs.shape[0], -1), c_new], axis=1)
            S[s_new[gs][:, None] + np.arange(new.shape[1])[None, :]] = new
        return S, s_new

def compute_crossprods(spec: ModelSpec, n_threads: int | None = None) -> CrossProducts:
    """One pass over the rows for the per-group blocks; X'X, X'y, y'y from the front end's
    column moments when it has them (ModelSpec.known_gram), else in a second pass
    (lmefast._crossprods.column_moments)."""
    lay = spec.layout
    s_off = record_offsets(lay, spec.k_fe)
    S = np.zeros(int(s_off[-1]))
    threads = default_threads(spec.n_groups) if n_threads is None else check_threads(n_threads)
    if threads <= 2:
        # a thread would first need its own rows listed (a serial pass over the rows) and then
        # gather them: measured on 2 cores (1,000,000 rows in random group order, records
        # prefetched), two threads were slower than one (random coefficients 1.7x, with a
        # variance component 1.5x)
        threads = 1
    accumulate(spec.y, spec.X, spec.Zre, spec.group_codes, lay.q_off, s_off,
               lay.vc_coord, lay.vc_val, S, threads)
    p = spec.k_fe
    G = spec.known_gram()
    if G is None:
        _, G, _, _ = column_moments(spec.X, spec.y, extremes=False)   # [X | y]'[X | y]
    return CrossProducts(S=S, s_off=s_off, XtX=np.ascontiguousarray(G[:p, :p]),
                         Xty=np.ascontiguousarray(G[:p, p]), yty=float(G[p, p]),
                         n=spec.nobs, layout=lay)


def record_offsets(layout: BlockLayout, p: int) -> np.ndarray:
    """Offsets of the per-group records [A_i | B_i | c_i]: sizes q_i² + q_i p + q_i."""
    q = np.diff(layout.q_off)
    s_off = np.zeros(q.shape[0] + 1, dtype=np.int64)
    np.cumsum(q * (q + p + 1), out=s_off[1:])
    return s_off
