"""The structure every model compiles to: random-effect terms and the one θ map over them.

A term is a grouping factor with a per-level design of k columns; its block of Λθ is
I_m ⊗ T, T a k × k lower-triangular matrix whose free entries (a pattern: the whole lower
triangle for correlated coefficients, the diagonal blocks for uncorrelated ones, one entry
for a variance component) are consecutive entries of θ. θ is the only optimisation
parameter; diagonal entries of T are ≥ 0, the others free (DESIGN.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import pandas as pd

from lmefast._crossprods import integer_codes


@dataclass(frozen=True, eq=False)
class ThetaMap:
    """θ = the free entries of each term's T, term after term; within a term in the order of
    its pattern (lme4's: by column, then row)."""

    ks: tuple[int, ...]
    patterns: tuple[tuple[np.ndarray, np.ndarray], ...]

    @classmethod
    def of_terms(cls, terms) -> ThetaMap:
        return cls(tuple(t.k for t in terms), tuple(t.pattern for t in terms))

    @cached_property
    def offsets(self) -> np.ndarray:
        sizes = [rows.shape[0] for rows, _ in self.patterns]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def n_theta(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def _diagonal(self) -> np.ndarray:
        if not self.patterns:
            return np.zeros(0, dtype=bool)
        return np.concatenate([rows == cols for rows, cols in self.patterns])

    def diagonal_mask(self) -> np.ndarray:
        """Which entries of θ are diagonal entries of their T (a new array each call)."""
        return self._diagonal.copy()

    def lower_bounds(self) -> np.ndarray:
        return np.where(self._diagonal, 0.0, -np.inf)

    def start(self) -> np.ndarray:
        """lme4's start: T = I for every term."""
        return self._diagonal.astype(float)

    def Ts(self, theta: np.ndarray) -> list[np.ndarray]:
        """θ → the T of every term (k × k, lower triangular)."""
        theta = np.asarray(theta, dtype=float)
        out = []
        for j, (k, pattern) in enumerate(zip(self.ks, self.patterns, strict=True)):
            T = np.zeros((k, k))
            T[pattern] = theta[self.offsets[j]:self.offsets[j + 1]]
            out.append(T)
        return out

    def free_masks(self) -> list[np.ndarray]:
        """Per term, the k × k mask of the free entries of T."""
        out = []
        for k, pattern in zip(self.ks, self.patterns, strict=True):
            free = np.zeros((k, k), dtype=bool)
            free[pattern] = True
            out.append(free)
        return out


@lru_cache(maxsize=64)
def full_pattern(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole lower triangle of a k × k T, by column then row (lme4's θ order); shared,
    read-only arrays (made once per k)."""
    cols, rows = np.triu_indices(k)
    out = rows.astype(np.int64), cols.astype(np.int64)
    for a in out:
        a.setflags(write=False)
    return out


SCALAR_PATTERN = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class Term:
    """A grouping factor with its per-level design and the free entries of its T.

    codes (n) level of each row; labels (m); Z (n × k); coef_names (k);
    pattern: (rows, cols) of the free entries of the k × k lower-triangular T, ordered as
    lme4 orders θ (by column, then row)."""

    name: str
    codes: np.ndarray
    labels: np.ndarray
    Z: np.ndarray
    coef_names: tuple[str, ...]
    pattern: tuple[np.ndarray, np.ndarray] = field(repr=False)

    @property
    def m(self) -> int:
        return int(self.labels.shape[0])

    @property
    def k(self) -> int:
        return int(self.Z.shape[1])


def factorize_groups(groups: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Group codes 0..m−1 (int64) in sorted label order, and the labels.

    Non-negative integer keys not much larger than the number of rows are coded by counting
    (O(n), no sort); anything else by pandas' hash factorisation."""
    values = groups.to_numpy() if groups.dtype.kind in "iu" else None
    if values is not None and values.size and values.min() >= 0 and values.max() < 4 * values.size + 1024:
        if values.dtype == np.int64:
            return integer_codes(np.ascontiguousarray(values), int(values.max()) + 1)
        present = np.bincount(values) > 0
        code_of = np.cumsum(present, dtype=np.int64) - 1
        return code_of[values], np.nonzero(present)[0].astype(values.dtype)
    codes, labels = pd.factorize(groups, sort=True)
    return codes.astype(np.int64), np.asarray(labels)
