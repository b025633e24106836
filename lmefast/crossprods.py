"""Cross-products: everything the profiled objective needs, from one pass over the rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmefast._crossprods import accumulate
from lmefast.parallel import default_threads
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

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])


def compute_crossprods(spec: ModelSpec, n_threads: int | None = None) -> CrossProducts:
    """One pass over the rows for the per-group blocks; X'X, X'y, y'y by BLAS."""
    lay = spec.layout
    s_off = record_offsets(lay, spec.k_fe)
    S = np.zeros(int(s_off[-1]))
    accumulate(spec.y, spec.X, spec.Zre, spec.group_codes, lay.q_off, s_off,
               lay.vc_coord, lay.vc_val, S,
               default_threads(spec.n_groups) if n_threads is None else n_threads)
    X, y = spec.X, spec.y
    return CrossProducts(S=S, s_off=s_off, XtX=X.T @ X, Xty=X.T @ y, yty=float(y @ y),
                         n=spec.nobs, layout=lay)


def record_offsets(layout: BlockLayout, p: int) -> np.ndarray:
    """Offsets of the per-group records [A_i | B_i | c_i]: sizes q_i² + q_i p + q_i."""
    q = np.diff(layout.q_off)
    s_off = np.zeros(q.shape[0] + 1, dtype=np.int64)
    np.cumsum(q * (q + p + 1), out=s_off[1:])
    return s_off
