"""Synthetic data sets shared by the tests and the benchmarks (one generator per model kind, so
that a test and a benchmark of the same model see the same data)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def random_slopes(n_rows: int = 1_000_000, n_groups: int = 100_000, seed: int = 1,
                  string_keys: bool = False) -> pd.DataFrame:
    """``y ~ x1 + x2 + (1 + x1 | g)``: intercept and slope standard deviations 1 and 0.5,
    residual 1; rows in random group order. ``g`` is the integer group key, or "g123" with
    ``string_keys=True``."""
    rng = np.random.default_rng(seed)
    g = np.arange(n_rows) % n_groups
    rng.shuffle(g)
    x1 = rng.standard_normal(n_rows)
    x2 = rng.standard_normal(n_rows)
    b0 = rng.normal(0.0, 1.0, n_groups)
    b1 = rng.normal(0.0, 0.5, n_groups)
    y = (1.0 + b0[g]) + (2.0 + b1[g]) * x1 - 0.5 * x2 + rng.standard_normal(n_rows)
    keys = pd.Series(g).map("g{}".format) if string_keys else g
    return pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": keys})


def crossed(n_rows: int = 1_000_000, levels_a: int = 50_000, levels_b: int = 2_000,
            seed: int = 3) -> pd.DataFrame:
    """``y ~ x + (1 | a) + (1 | b)``: two crossed factors with standard deviations 1 and 0.5,
    residual 1, levels drawn at random per row."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, levels_a, n_rows)
    b = rng.integers(0, levels_b, n_rows)
    x = rng.standard_normal(n_rows)
    y = 1 + 0.5 * x + rng.normal(0, 1.0, levels_a)[a] + rng.normal(0, 0.5, levels_b)[b] \
        + rng.standard_normal(n_rows)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})
