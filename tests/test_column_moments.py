"""The one-pass column statistics (lmefast._crossprods.column_moments) behind the scaling map,
the rank checks and X'X, X'y, y'y of the pass over the rows: against numpy on the same data."""
from __future__ import annotations

import numpy as np
import pytest
from lmefast._crossprods import column_moments

from lmefast.scaling import column_map


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1000, 5), (2051, 8), (300, 11)])
@pytest.mark.parametrize("order", ["C", "F", "view"])
def test_moments_equal_numpy(shape: tuple[int, int], order: str) -> None:
    rng = np.random.default_rng(sum(shape))
    big = rng.normal(3.0, 2.0, size=(shape[0], shape[1] + 2))
    A = {"C": np.ascontiguousarray(big[:, :shape[1]]), "F": np.asfortranarray(big[:, :shape[1]]),
         "view": big[:, 1:shape[1] + 1]}[order]
    sums, G, lo, hi = column_moments(A)
    np.testing.assert_allclose(sums, A.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(G, A.T @ A, rtol=1e-12)
    np.testing.assert_array_equal(lo, A.min(axis=0))
    np.testing.assert_array_equal(hi, A.max(axis=0))
    y = big[:, -1]
    _, Gy, _, _ = column_moments(A, y, extremes=False)
    B = np.column_stack([A, y])
    np.testing.assert_allclose(Gy, B.T @ B, rtol=1e-12)


def test_empty_and_response_only() -> None:
    sums, G, _, _ = column_moments(np.zeros((0, 3)))
    assert sums.shape == (3,) and np.all(G == 0)
    y = np.array([1.0, 2.0, 4.0])
    _, G, _, _ = column_moments(np.zeros((3, 0)), y)
    assert G[0, 0] == pytest.approx(21.0)
    with pytest.raises(ValueError, match="rows"):
        column_moments(np.zeros((4, 2)), y)


def test_scaling_map_from_moments_survives_cancellation() -> None:
    """Seconds since 1970: the variance from the second moment would lose every digit; the
    map centres the column (mean far from zero) and scales it by the power of two nearest its
    standard deviation, as the exact two-pass statistics say."""
    rng = np.random.default_rng(1)
    t = 1.7e9 + 86400.0 * rng.uniform(0, 10, 500)
    X = np.column_stack([np.ones(500), t])
    M = column_map(X, centre=True)
    sd = t.std()
    assert M[1, 1] == 2.0 ** -np.round(np.log2(sd))
    assert M[0, 1] == pytest.approx(-t.mean() * M[1, 1], rel=1e-12)
    Xs = X @ M
    assert abs(Xs[:, 1].mean()) < 1.0 and 0.5 < Xs[:, 1].std() < 2.0
