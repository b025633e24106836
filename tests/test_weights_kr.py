"""Kenward-Roger with prior weights against pbkrtest's algorithm on the weighted model's
V = ZΣZ' + σ²W⁻¹ (∂V/∂σ² = W⁻¹): tests/data/make_weights_kr_reference.R runs pbkrtest's own
vcovAdj_internal and Lb_ddf with that residual term (pbkrtest 0.5.2 itself uses σ²I there,
ignoring the weights, so its plain get_Lb_ddf is not the reference; the script records it too)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmefast

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "reference" / "weights_kr.json").read_text())["cases"]
FRAMES = {"sleep": pd.read_csv(DATA / "weights_data_sleepstudy.csv"),
          "pen": pd.read_csv(DATA / "weights_data_penicillin.csv")}


@pytest.mark.parametrize("case", REF, ids=[c["name"] for c in REF])
def test_kenward_roger_with_weights_matches_pbkrtest_on_the_weighted_v(case: dict) -> None:
    data = FRAMES["sleep" if case["name"].startswith("sleep") else "pen"]
    res = lmefast.lmer(case["formula"], data, weights=case["weights"], offset=case["offset"])
    assert res.llf == pytest.approx(case["loglik"], rel=1e-8)
    names = list(case["df_kenward_roger"])
    ct = res.coef_table(ddf="kenward-roger").loc[names]
    np.testing.assert_allclose(ct["df"].to_numpy(), [case["df_kenward_roger"][k] for k in names], rtol=1e-4)
    adjusted = np.atleast_2d(np.array(case["vcov_adjusted"], dtype=float))
    np.testing.assert_allclose(ct["std_err"].to_numpy(), np.sqrt(np.diag(adjusted)), rtol=1e-5)
    # the weights matter: the residual term σ²I (what pbkrtest does) gives other df
    ignoring = [case["df_pbkrtest_residual_ignoring_weights"][k] for k in names]
    assert np.all(np.abs(ct["df"].to_numpy() / ignoring - 1) > 1e-3)
