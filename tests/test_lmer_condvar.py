"""Conditional variances of the random effects (lme4's condVar) for several grouping factors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg as sla

import lmefast

DATA = Path(__file__).parent / "data"
CASES = [("penicillin_crossed", "Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
         ("pastes_nested", "Pastes", "strength ~ 1 + (1|batch/cask)")]


@pytest.mark.parametrize(("cid", "data", "formula"), CASES)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_condvar_matches_lme4(cid: str, data: str, formula: str, method: str) -> None:
    res = lmefast.lmer(formula, pd.read_csv(DATA / f"{data}.csv"), reml=method == "reml")
    ref = json.loads((DATA / "reference" / f"{cid}__{method}.json").read_text())
    for name, cv in res.random_effects_cov.items():
        lme4_name = "cask:batch" if name == "batch:cask" else name
        entry = ref["ranef"][lme4_name]
        ours_levels = [str(lev) for lev in res.random_effects[name].index]
        lme4_levels = [":".join(reversed(lev.split(":"))) if name == "batch:cask" else str(lev)
                       for lev in entry["levels"]]
        order = [ours_levels.index(lev) for lev in lme4_levels]
        expected = np.asarray(entry["condvar"], dtype=float).ravel()
        np.testing.assert_allclose(cv[order, 0, 0], expected, rtol=1e-4)


def test_condvar_matches_dense_with_random_slopes() -> None:
    """σ² Λ M⁻¹ Λ' level blocks from first principles, with 2 × 2 blocks in both factors."""
    rng = np.random.default_rng(7)
    n = 240
    df = pd.DataFrame({"g": rng.integers(0, 12, n), "h": rng.integers(0, 5, n),
                       "x": rng.standard_normal(n)})
    df["y"] = 1 + df.x + rng.normal(0, 1, 12)[df.g] + rng.normal(0, 1, 5)[df.h] * df.x \
        + rng.standard_normal(n)
    model = lmefast.lmer_model("y ~ x + (1 + x | g) + (1 + x | h)", df)
    res = model.fit()
    blocks_Z, blocks_L = [], []
    for t, T in zip(model.terms, model.theta_map.Ts(res.theta), strict=True):
        Zj = np.zeros((n, t.m * t.k))
        for a in range(t.k):
            Zj[np.arange(n), t.codes * t.k + a] = t.Z[:, a]
        blocks_Z.append(Zj)
        blocks_L.append(np.kron(np.eye(t.m), T))
    Z, Lam = np.hstack(blocks_Z), sla.block_diag(*blocks_L)
    M = Lam.T @ Z.T @ Z @ Lam + np.eye(Z.shape[1])
    full = res.scale * Lam @ np.linalg.inv(M) @ Lam.T
    off = 0
    for t in model.terms:
        cv = res.random_effects_cov[t.name]
        for lev in range(t.m):
            sl = slice(off + lev * t.k, off + (lev + 1) * t.k)
            np.testing.assert_allclose(cv[lev], full[sl, sl], rtol=1e-8, atol=1e-12)
        off += t.m * t.k
