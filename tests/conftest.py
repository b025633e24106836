"""Shared fixtures: the data sets and lme4 reference fits in tests/data (at the optimum: lme4
refitted at tight tolerances), fitted models (cached per session), and the Hypothesis profiles.

No R, no network: everything is read from tests/data (lme4 1.1-31 reference results).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

import lmefast

# -- Hypothesis: reproducible by default ---------------------------------------------------------
# "ci" (the default, and whenever CI is set): the same examples on every run, no example database
# (nothing read from or written to .hypothesis/). "explore": fresh random examples, for a developer
# hunting new failures (HYPOTHESIS_PROFILE=explore pytest ...).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DATA_DIR = Path(__file__).parent / "data"
REF_DIR = DATA_DIR / "reference"


# -- data -------------------------------------------------------------------------------------
@cache
def _read_csv(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / f"{name}.csv")


def read_data(name: str) -> pd.DataFrame:
    """A fresh copy of tests/data/<name>.csv (tests may modify it)."""
    return _read_csv(name).copy()


@cache
def _cases() -> tuple[dict[str, Any], ...]:
    with open(DATA_DIR / "cases.json") as fh:
        return tuple(json.load(fh))


def all_cases() -> list[dict[str, Any]]:
    return [dict(c) for c in _cases()]


def one_factor_cases() -> list[dict[str, Any]]:
    """The cases statsmodels' API can express: one grouping factor ("sm"."groups" not null)."""
    return [c for c in all_cases() if c["sm"].get("groups") is not None]


def case_by_id(case_id: str) -> dict[str, Any]:
    for c in all_cases():
        if c["id"] == case_id:
            return c
    raise KeyError(case_id)


# -- reference fits ----------------------------------------------------------------------------
def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


@dataclass
class RanefTerm:
    """lme4's ranef() and condVar for one grouping factor, normalised."""

    levels: list[str]
    terms: list[str]
    values: np.ndarray                  # levels × terms
    condvar: np.ndarray | None          # levels × terms × terms (None if lme4 gave none)


@dataclass
class Reference:
    """One lme4 fit (tests/data/reference/<id>__reml.json or __ml.json), normalised: single-element
    fields that R wrote as scalars or 1-element lists become dicts / arrays."""

    raw: dict[str, Any]
    fixef: dict[str, float]
    se_fixef: dict[str, float]
    theta: np.ndarray
    sigma: float
    loglik: float
    objective: float
    singular: bool
    varcorr: list[dict[str, Any]]
    ranef: dict[str, RanefTerm] = field(default_factory=dict)


def _named(values: Any, names: list[str]) -> dict[str, float]:
    if isinstance(values, dict):
        return {str(k): float(v) for k, v in values.items()}
    vals = _as_list(values)
    assert len(vals) == len(names), (values, names)
    return {n: float(v) for n, v in zip(names, vals, strict=True)}


@cache
def _load_reference(case_id: str, reml: bool) -> Reference:
    path = REF_DIR / f"{case_id}__{'reml' if reml else 'ml'}.json"
    with open(path) as fh:
        raw = json.load(fh)
    assert bool(raw["reml"]) == reml
    fe_names = list(raw["fixef"].keys()) if isinstance(raw["fixef"], dict) else ["(Intercept)"]
    fixef = _named(raw["fixef"], fe_names)
    se = _named(raw["se_fixef"], fe_names)
    ranef: dict[str, RanefTerm] = {}
    for grp, rr in raw["ranef"].items():
        levels = [str(v) for v in _as_list(rr["levels"])]
        terms = [str(t) for t in _as_list(rr["terms"])]
        values = np.array(rr["values"], dtype=float).reshape(len(levels), len(terms))
        cv = rr.get("condvar")
        condvar = None
        if cv is not None:
            condvar = np.array(cv, dtype=float).reshape(len(levels), len(terms), len(terms))
        ranef[grp] = RanefTerm(levels, terms, values, condvar)
    return Reference(
        raw=raw, fixef=fixef, se_fixef=se,
        theta=np.array(_as_list(raw["theta"]), dtype=float),
        sigma=float(raw["sigma"]), loglik=float(raw["loglik"]), objective=float(raw["objective"]),
        singular=bool(raw["singular"]), varcorr=list(raw["varcorr"]), ranef=ranef)


def load_reference(case_id: str, reml: bool) -> Reference:
    return _load_reference(case_id, reml)


# -- fitting -----------------------------------------------------------------------------------
CONSTANT_GROUP = "_one"


def build_model(case: dict[str, Any], **overrides: Any) -> lmefast.MixedLM:
    """The case's model in statsmodels' spelling. Crossed random effects ("sm"."groups" null) use
    statsmodels' idiom: one group spanning all rows (a constant column), re_formula '0', and each
    crossed factor a variance component."""
    sm = case["sm"]
    df = read_data(case["data"])
    kwargs: dict[str, Any] = {"groups": sm["groups"], "re_formula": sm.get("re_formula"),
                              "vc_formula": sm.get("vc_formula")}
    if sm["groups"] is None:
        df[CONSTANT_GROUP] = 1
        kwargs["groups"] = CONSTANT_GROUP
        kwargs["re_formula"] = "0"
    kwargs.update(overrides)
    return lmefast.mixedlm(sm["formula"], df, **kwargs)


@cache
def _fit(case_id: str, reml: bool) -> tuple[lmefast.MixedLM, lmefast.MixedLMResults]:
    model = build_model(case_by_id(case_id))
    return model, model.fit(reml=reml)


def fit_case(case_id: str, reml: bool) -> tuple[lmefast.MixedLM, lmefast.MixedLMResults]:
    """(model, results) for a case, cached for the session: do not mutate them."""
    return _fit(case_id, reml)


# -- lme4 formulas (lmefast.lmer) ---------------------------------------------------------------
@cache
def _lmer_fit(case_id: str, reml: bool) -> tuple[Any, lmefast.MixedLMResults]:
    case = case_by_id(case_id)
    model = lmefast.lmer_model(case["lme4"], read_data(case["data"]))
    return model, model.fit(reml=reml)


def fit_lmer_case(case_id: str, reml: bool) -> tuple[Any, lmefast.MixedLMResults]:
    """(model, results) of a case fitted from its lme4 formula ("lme4" field) by lmefast.lmer_model,
    cached for the session: do not mutate them. The model is a MixedLM (one grouping factor after
    merging terms) or a MixedLM on the blocked engine."""
    return _lmer_fit(case_id, reml)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data() -> Callable[[str], pd.DataFrame]:
    """data('dietox') → a fresh DataFrame of tests/data/dietox.csv."""
    return read_data


@pytest.fixture
def dietox() -> pd.DataFrame:
    return read_data("dietox")


@pytest.fixture
def sleepstudy() -> pd.DataFrame:
    return read_data("sleepstudy")


@pytest.fixture
def pastes() -> pd.DataFrame:
    return read_data("Pastes")


@pytest.fixture(scope="session")
def reference() -> Callable[[str, bool], Reference]:
    """reference(case_id, reml) → the normalised lme4 fit."""
    return load_reference


@pytest.fixture(scope="session")
def fitted() -> Callable[[str, bool], tuple[lmefast.MixedLM, lmefast.MixedLMResults]]:
    """fitted(case_id, reml) → (model, results), cached for the session (do not mutate)."""
    return fit_case


@pytest.fixture(params=[True, False], ids=["REML", "ML"])
def reml(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


ONE_FACTOR_IDS = [c["id"] for c in one_factor_cases()]


@pytest.fixture(params=ONE_FACTOR_IDS)
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each cases.json entry with one grouping factor."""
    return case_by_id(request.param)


ALL_IDS = [c["id"] for c in all_cases()]


@pytest.fixture(params=ALL_IDS)
def any_case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every cases.json entry: one grouping factor, or crossed factors as one group (build_model)."""
    return case_by_id(request.param)


# -- listed expected failures ---------------------------------------------------------------------
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test module may list its known failures in EXPECTED_FAILURES (test id → reason); they
    become strict xfails, so a listed test that passes fails the run (tests/test_statsmodels_suite.py)."""
    for item in items:
        listed = getattr(getattr(item, "module", None), "EXPECTED_FAILURES", None)
        if listed:
            reason = listed.get(item.nodeid.split("::", 1)[1])
            if reason is not None:
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
