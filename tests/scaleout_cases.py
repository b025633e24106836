"""Shared by the scale-out tests (Parquet, Dask): the models, the data, and the comparison of a
fit from chunked data with the in-memory fit of the same rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import read_data

import lmefast
from lmefast._testing import random_slopes

# id, data set, formula, groups, re_formula, vc_formula
MODELS = [
    ("sleepstudy", "sleepstudy", "Reaction ~ Days", "Subject", "~Days", None),
    ("dietox", "dietox", "Weight ~ Time", "Pig", "~Time", None),
    ("dietox_cat", "dietox", "Weight ~ Time + Cu", "Pig", "~Time", None),       # string predictor
    ("orthodont", "Orthodont", "distance ~ age + Sex", "Subject", "~age", None),  # string groups
    ("synthetic", None, "y ~ x1 + x2", "g", "~x1", None),
    # variance components nested in the groups (statsmodels' vc_formula)
    ("pastes_nested", "Pastes", "strength ~ 1", "batch", "1", {"cask": "0 + C(cask)"}),
    ("sleep_zc", "sleepstudy", "Reaction ~ Days", "Subject", "1", {"Days": "0 + Days"}),
    ("synthetic_vc", None, "y ~ x1 + x2", "g", "~x1", {"h": "0 + C(h)", "x2": "0 + x2"}),
]
MODEL_IDS = [m[0] for m in MODELS]
# Tolerances. A scale-out fit sums the same rows as the in-memory one, in another order (chunks,
# partitions, threads), so its cross-products differ by rounding: relative n·ε at worst (n ≤ 6e4 rows,
# ε = 2.2e-16: ≤ 1.3e-11), and what is solved from them at one θ (objective, β̂, σ², modes) differs by
# that times the condition of the small systems solved (≤ 1e2 here): RTOL_SAME_THETA. The optimiser,
# fed objectives that differ by rounding, stops near the same θ̂ but not at the same last bits: its
# convergence test leaves θ̂ determined to ~1e-4 of a standard error (test_reference), far looser than
# the agreement seen (~1e-10 on one machine's BLAS). RTOL = 1e-7 for everything that follows θ̂ allows
# for another BLAS's rounding and still fails on any real difference in the data (one row of 20,000
# changed moves θ̂ by more than 1e-6, measured in test_outofcore.py).
RTOL_SAME_THETA = 1e-9
RTOL = 1e-7


def synthetic(n_rows: int = 20_000, n_groups: int = 400, seed: int = 3, string_keys: bool = False
              ) -> pd.DataFrame:
    """y ~ x1 + x2 + (1 + x1 | g), rows in random group order (the benchmarks' generator)."""
    return random_slopes(n_rows, n_groups, seed, string_keys)


def model_data(model_id: str) -> tuple[pd.DataFrame, str, str, str, dict | None]:
    """(rows in a random order, so that groups span chunks; formula; groups; re_formula;
    vc_formula)."""
    _, name, formula, groups, re_formula, vc = next(m for m in MODELS if m[0] == model_id)
    df = synthetic() if name is None else read_data(name)
    if model_id == "synthetic_vc":  # a factor nested in the groups, levels shared by name
        rng = np.random.default_rng(17)
        df["h"] = np.char.add("h", rng.integers(0, 4, len(df)).astype(str))
        m = df["g"].max() + 1
        df["y"] += rng.normal(0.0, 0.7, m * 4)[df["g"] * 4 + df["h"].str[1:].astype(int)]
        df["y"] += rng.normal(0.0, 0.3, m)[df["g"]] * df["x2"]
    df = df.iloc[np.random.default_rng(7).permutation(len(df))].reset_index(drop=True)
    return df, formula, groups, re_formula, vc


def write_parquet(df: pd.DataFrame, directory: Path, n_files: int = 3, row_group_size: int = 50) -> Path:
    """The rows in order over n_files files of small row groups."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(df)), n_files)):
        df.iloc[idx].to_parquet(directory / f"part-{i:03d}.parquet", row_group_size=row_group_size,
                                index=False)
    return directory


def in_memory(df: pd.DataFrame, formula: str, groups: str, re_formula: str, reml: bool, vc: dict | None = None,
              **kw) -> lmefast.MixedLMResults:
    return lmefast.mixedlm(formula, df, groups=groups, re_formula=re_formula, vc_formula=vc,
                           **kw).fit(reml=reml)


def close(a, b, rtol: float = RTOL) -> None:
    """max |a − b| ≤ rtol · max |b| (relative to the size of the quantity)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    a, b = a[~np.isnan(b)], b[~np.isnan(b)]
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    err = float(np.max(np.abs(a - b), initial=0.0))
    assert err <= rtol * scale, f"max abs difference {err:.3g} > {rtol:g} x {scale:.3g}"


def assert_same_fit(big, mem, rtol: float = RTOL) -> None:
    """Everything that comes from the cross-products agrees with the in-memory fit to rtol."""
    assert big.nobs == mem.nobs
    assert big.n_groups == mem.n_groups
    assert big.method == mem.method
    assert big.converged and mem.converged
    assert list(big.params.index) == list(mem.params.index)
    assert list(big.model.exog_re_names) == list(mem.model.exog_re_names)
    np.testing.assert_array_equal(big.model.spec.group_labels, mem.model.spec.group_labels)
    # the same objective: at the in-memory θ̂, the scale-out sums give its objective, β̂ and σ²
    same = big.model.objective(big.reml).solve(mem.theta)
    at_mem = mem.model.objective(mem.reml).solve(mem.theta)
    close(same.objective, at_mem.objective, RTOL_SAME_THETA)
    close(same.beta, at_mem.beta, RTOL_SAME_THETA)
    close(same.sigma2, at_mem.sigma2, RTOL_SAME_THETA)
    # the same fit, to the optimiser's reproducibility under rounding
    close(big.llf, mem.llf, 1e-10)   # flat at the optimum: −2ℓ moves by θ-error² only
    close(big.theta, mem.theta, rtol)
    close(big.scale, mem.scale, rtol)
    close(big.fe_params, mem.fe_params, rtol)
    close(big.bse_fe, mem.bse_fe, rtol)
    close(big.params, mem.params, rtol)
    close(big.cov_re, mem.cov_re, rtol)
    close(big.aic, mem.aic, rtol)
    re_big, re_mem = big.random_effects_frame, mem.random_effects_frame
    assert list(re_big.index) == list(re_mem.index)
    for col in re_mem.columns:
        close(re_big[col], re_mem[col], rtol)
    close(big.vcomp, mem.vcomp, rtol)
    for lab in mem.model.spec.group_labels[:3]:
        assert list(big.random_effects[lab].index) == list(mem.random_effects[lab].index)
        close(big.random_effects[lab], mem.random_effects[lab], 1e-8)
        close(big.random_effects_cov[lab], mem.random_effects_cov[lab], 1e-8)
    # the variance parameters' standard errors: finite differences of the analytic gradient
    # (results._cov_psi), stable to ~1e-8 under the order of the rows
    close(big.bse_re, mem.bse_re, 1e-6)
    assert np.array_equal(big._group_sizes()[big.model.spec.group_name],
                          mem._group_sizes()[mem.model.spec.group_name])
    text = str(big.summary())
    assert "No. Groups:" in text and f"{big.llf:.4f}" in text
