"""Summaries follow the API: statsmodels' table for MixedLM/mixedlm, lme4's layout for lmer (a VarCorr
block — Groups, Name, Variance, Std.Dev., Corr — then the fixed effects), with lme4's numbers."""
from __future__ import annotations

import json
from pathlib import Path

import lmefast
from lmefast.datasets import load_penicillin, load_sleepstudy

REF = Path(__file__).parent / "data" / "reference"


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_lmer_summary_is_lme4s_layout_with_lme4s_numbers() -> None:
    text = str(lmefast.lmer("Reaction ~ Days + (Days | Subject)", load_sleepstudy()).summary())
    ref = json.loads((REF / "sleep_rs__reml.json").read_text())
    vc = {(r["grp"], r["var1"], r["var2"]): r for r in ref["varcorr"]}
    lines = _lines(text)
    assert ["Groups", "Name", "Variance", "Std.Dev.", "Corr"] in lines
    intercept = next(x for x in lines if x[:2] == ["Subject", "(Intercept)"])
    days = next(x for x in lines if x[:1] == ["Days"] and len(x) == 4)
    resid = next(x for x in lines if x[:1] == ["Residual"])
    for got, key in ((intercept[2:4], ("Subject", "(Intercept)", None)), (days[1:3], ("Subject", "Days", None)),
                     (resid[1:3], ("Residual", None, None))):
        # printed to 4 significant digits
        assert abs(float(got[0]) / vc[key]["vcov"] - 1) < 1e-3
        assert abs(float(got[1]) / vc[key]["sdcor"] - 1) < 1e-3
    assert abs(float(days[3]) - vc[("Subject", "(Intercept)", "Days")]["sdcor"]) < 0.006   # Corr, 2 digits
    assert "Number of obs: 180, groups:  Subject, 18" in text
    fixed = next(x for x in lines if x[:1] == ["Days"] and len(x) == 4 and x is not days)
    assert abs(float(fixed[1]) - ref["fixef"]["Days"]) < 0.01


def test_lmer_summary_with_satterthwaite_and_statsmodels_layout_otherwise() -> None:
    pen = lmefast.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", load_penicillin())
    text = str(pen.summary(ddf="satterthwaite"))
    row = next(x for x in _lines(text) if x[:1] == ["(Intercept)"] and len(x) == 6)
    assert abs(float(row[3]) - pen.coef_table("satterthwaite")["df"].iloc[0]) < 0.01
    assert "Number of obs: 144, groups:  plate, 24, sample, 6" in text
    sm = str(lmefast.mixedlm("Reaction ~ Days", load_sleepstudy(), groups="Subject", re_formula="~Days")
             .fit().summary())
    assert "Mixed Linear Model Regression Results" in sm and "Random effects:" not in sm
