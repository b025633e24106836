"""ModelSpec: the arrays and structure every front end compiles to (DESIGN.md §3).

One grouping factor: y (n), X (n × p), a group code per row, the random-coefficient design
Zre (n × k) and variance components, each a design within groups whose non-zero columns in a
group become that group's coordinates. The θ map: the k × k lower-triangular T (column-major
lower triangle, as lme4 orders θ), then one θ per variance component.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lmefast.errors import SpecificationError
from lmefast.structure import SCALAR_PATTERN, ThetaMap, full_pattern

__all__ = ["BlockLayout", "GroupThetaMap", "ModelSpec", "SpecificationError", "build_layout", "row_entries"]


@dataclass(frozen=True)
class BlockLayout:
    """Where each group's coordinates live in the flat per-group arrays.

    q_off (m+1): coordinate offsets (group i owns coordinates q_off[i]:q_off[i+1]);
    a_off (m+1): offsets of the q_i × q_i blocks in a flat array;
    comp: per coordinate, the variance component it belongs to (0 for the k
    random-coefficient coordinates, which do not use it); col: per coordinate, its column
    in the random-coefficient design or in its component's design.
    vc_coord, vc_val (ne × n): each row's variance-component entries (coordinate within the
    group's block, value; value 0 where a row has fewer entries).
    """

    q_off: np.ndarray
    a_off: np.ndarray
    comp: np.ndarray
    col: np.ndarray
    vc_coord: np.ndarray
    vc_val: np.ndarray

    @property
    def qmax(self) -> int:
        return int(np.diff(self.q_off).max(initial=0))


class GroupThetaMap(ThetaMap):
    """The θ map of one grouping factor: θ = [the free entries of T, by column then row
    (lme4's order)] + [one θ per variance component]. A ThetaMap over the terms
    [random coefficients (when k > 0), then one scalar term per variance component]."""

    def __init__(self, k: int, n_vc: int, re_names: tuple[str, ...], vc_names: tuple[str, ...],
                 pattern: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        tril = full_pattern(k) if pattern is None else tuple(np.asarray(a, dtype=np.int64) for a in pattern)
        coef = ((k,), (tril,)) if k else ((), ())
        super().__init__(coef[0] + (1,) * n_vc, coef[1] + (SCALAR_PATTERN,) * n_vc)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "n_vc", n_vc)
        object.__setattr__(self, "re_names", tuple(re_names))
        object.__setattr__(self, "vc_names", tuple(vc_names))
        object.__setattr__(self, "tril", tril)

    def covariance_basis(self, comp: np.ndarray) -> np.ndarray | None:
        """The symmetric q × q basis matrices (one a row, flattened) of Ψ for one grouping factor:
        every entry of the k × k block (unstructured T) or its diagonal (diagonal T), then one
        diagonal indicator per variance component over its coordinates (comp, after the k)."""
        k, (rows, cols) = self.k, self.tril
        q = k + comp.shape[0]
        if not (np.all(rows == cols) or rows.shape[0] == k * (k + 1) // 2):
            return None
        out = []
        for r, c in zip(rows, cols, strict=True):
            E = np.zeros((q, q))
            E[r, c] = E[c, r] = 1.0
            out.append(E.ravel())
        for c in range(self.n_vc):
            out.append(np.diag(np.concatenate([np.zeros(k), comp == c]).astype(float)).ravel())
        return np.array(out)

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """θ → (T as k × k lower triangular, θ of the variance components)."""
        theta = np.asarray(theta, dtype=float)
        T = np.zeros((self.k, self.k))
        nt = self.n_theta - self.n_vc
        T[self.tril] = theta[:nt]
        return T, np.ascontiguousarray(theta[nt:], dtype=float)


@dataclass(frozen=True)
class ModelSpec:
    """A one-grouping-factor model, validated and ready for the pass over the rows."""

    y: np.ndarray
    X: np.ndarray
    group_codes: np.ndarray
    group_labels: np.ndarray
    Zre: np.ndarray
    layout: BlockLayout
    theta_map: GroupThetaMap
    endog_name: str
    exog_names: tuple[str, ...]
    group_name: str
    vc_col_names: tuple[tuple[str, ...], ...]
    dropped_exog: tuple[str, ...] = ()
    #: (X, y, [X | y]'[X | y]) when the front end has the Gram matrix of these very arrays
    #: (column_moments' sums); the pass over the rows then skips it. A spec made by
    #: ``dataclasses.replace`` with other X or y does not match and makes its own.
    row_gram: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def known_gram(self) -> np.ndarray | None:
        """[X | y]'[X | y] when the front end computed it from this spec's X and y, else None."""
        if self.row_gram is None:
            return None
        X, y, G = self.row_gram
        return G if X is self.X and y is self.y else None

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.group_labels.shape[0])

    @property
    def k_fe(self) -> int:
        return int(self.X.shape[1])

    @property
    def k_re(self) -> int:
        return self.theta_map.k

    def coord_names(self, g: int) -> list[str]:
        """Names of group g's random-effect coordinates (statsmodels' random_effects index)."""
        lo, hi = self.layout.q_off[g], self.layout.q_off[g + 1]
        k = self.theta_map.k
        names = list(self.theta_map.re_names)
        for j in range(lo + k, hi):
            comp = int(self.layout.comp[j])
            names.append(f"{self.theta_map.vc_names[comp]}[{self.vc_col_names[comp][self.layout.col[j]]}]")
        return names


def _unique_keys(keys: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_inverse=True) for non-negative integer keys below ``top``: by
    marking the keys present when that table is not much larger than the keys (O(n), no
    sort), else by sorting."""
    if keys.size == 0 or top > 4 * keys.size + 1024:
        return np.unique(keys, return_inverse=True)
    present = np.zeros(top, dtype=bool)
    present[keys] = True
    uniq = np.flatnonzero(present)
    code_of = np.cumsum(present, dtype=np.int64) - 1
    return uniq, code_of[keys]


def row_entries(rows: np.ndarray, coords: np.ndarray, vals: np.ndarray, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sparse per-row entries (row, coordinate, value) as the (ne × n) arrays vc_coord, vc_val
    of BlockLayout: entry e of row r in slot e (value 0 where a row has fewer entries)."""
    if n and rows.shape[0] == n and np.array_equal(rows, np.arange(n)):
        # one entry per row, in row order (an indicator design): all in slot 0
        return coords.astype(np.int64).reshape(1, n), vals.astype(float).reshape(1, n)
    order = np.argsort(rows, kind="stable")
    rows_s = rows[order]
    per_row = np.bincount(rows_s, minlength=n)
    start = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    slot = np.empty_like(rows)
    slot[order] = np.arange(rows_s.shape[0]) - start[rows_s]
    ne = int(per_row.max(initial=0))
    coord = np.zeros((ne, n), dtype=np.int64)
    value = np.zeros((ne, n))
    coord[slot, rows] = coords
    value[slot, rows] = vals
    return coord, value


def build_layout(codes: np.ndarray, m: int, k: int, vc_designs: list) -> BlockLayout:
    """Per-group coordinates from the non-zero columns of each variance component in each group.

    vc_designs: one n × K_j matrix (dense or scipy.sparse) per component. Group i's block is
    [k random coefficients][component 0's non-zero columns in i][component 1's]... Fully
    vectorised: one sort of the non-zero entries per component, no loop over groups.
    """
    n = codes.shape[0]
    if not vc_designs:   # random coefficients only: every group's block is k × k
        steps = np.arange(m + 1, dtype=np.int64)
        return BlockLayout(steps * k, steps * (k * k), np.zeros(m * k, dtype=np.int64),
                           np.tile(np.arange(k, dtype=np.int64), m),
                           np.zeros((0, n), dtype=np.int64), np.zeros((0, n)))
    counts = []
    entries = []  # per component: (rows, coordinate within group, value) before offsets
    for V in vc_designs:
        coo = sp.coo_matrix(V)
        keep = coo.data != 0
        rows, cols, vals = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
        K = max(int(V.shape[1]), 1)
        keys = codes[rows] * K + cols
        uniq, inv = _unique_keys(keys, m * K)
        ug = uniq // K
        cnt = np.bincount(ug, minlength=m).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        rank = np.arange(uniq.shape[0]) - first[ug]
        counts.append(cnt)
        entries.append((rows, rank[inv], vals.astype(float), ug, rank, uniq % K))
    q = np.full(m, k, dtype=np.int64)
    bases = []
    for cnt in counts:
        bases.append(q.copy())
        q += cnt
    q_off = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(q, out=q_off[1:])
    a_off = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(q * q, out=a_off[1:])
    total = int(q_off[-1])
    comp = np.zeros(total, dtype=np.int64)
    col = np.zeros(total, dtype=np.int64)
    if k:
        pos = (q_off[:-1, None] + np.arange(k)).ravel()
        col[pos] = np.tile(np.arange(k), m)
    slots = []
    for j, (rows, local, vals, ug, rank, ucol) in enumerate(entries):
        pos = q_off[ug] + bases[j][ug] + rank
        comp[pos] = j
        col[pos] = ucol
        slots.append(row_entries(rows, bases[j][codes[rows]] + local, vals, n))
    if slots:
        vc_coord = np.ascontiguousarray(np.concatenate([s[0] for s in slots]))
        vc_val = np.ascontiguousarray(np.concatenate([s[1] for s in slots]))
    else:
        vc_coord = np.zeros((0, n), dtype=np.int64)
        vc_val = np.zeros((0, n))
    return BlockLayout(q_off, a_off, comp, col, vc_coord, vc_val)
