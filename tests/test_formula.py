"""The formula front end's direct paths give what formulaic gives."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from formulaic import model_matrix

from lmefast.formula import design_matrix


def frame() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    n = 40
    return pd.DataFrame({
        "s": rng.choice(["b", "a", "c"], n), "i": rng.integers(3, 7, n), "x": rng.standard_normal(n),
        "cat": pd.Categorical(rng.choice(["z", "y"], n), categories=["z", "y"]),
        "b": rng.integers(0, 2, n).astype(bool),
    })


@pytest.mark.parametrize("formula", ["0 + C(s)", "0 + s", "0 + C(i)", "0 + C(cat)", "0 + cat",
                                     "0 + C(b)", "0 + x", "0 + C(s):x", "1 + C(s)"])
def test_sparse_designs_match_formulaic(formula: str) -> None:
    df = frame()
    ours, names = design_matrix(formula, df, sparse=True)
    mm = model_matrix("~" + formula, df, output="sparse")
    theirs = getattr(mm, "__wrapped__", mm).tocsr()
    assert names == [str(c) for c in mm.model_spec.column_names]
    assert ours.shape == theirs.shape
    assert abs(ours - theirs).sum() == 0


@pytest.mark.parametrize("formula", ["x", "1 + x + i", "0 + x", "x + C(s)", "x:i"])
def test_dense_designs_match_formulaic(formula: str) -> None:
    df = frame()
    ours, names = design_matrix(formula, df)
    mm = model_matrix("~" + formula, df)
    assert names == [str(c) for c in mm.columns]
    np.testing.assert_array_equal(ours, mm.to_numpy(dtype=float))
