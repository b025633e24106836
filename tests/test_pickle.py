"""Every model and results object survives pickle and deepcopy with identical numbers (process
pools, caches and joblib need it): one grouping factor, several, Parquet and Dask data. The C
kernels are not pickled; the results rebuild them from the cross-products."""
from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmefast
from lmefast import datasets


def _round_trips(obj):
    yield pickle.loads(pickle.dumps(obj))
    yield copy.deepcopy(obj)


def _same(a: lmefast.MixedLMResults, b: lmefast.MixedLMResults, rows: bool = True) -> None:
    pd.testing.assert_series_equal(a.params, b.params, check_exact=True)
    pd.testing.assert_series_equal(a.bse, b.bse, check_exact=True)
    assert a.llf == b.llf and a.scale == b.scale
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.conf_int().to_numpy(), b.conf_int().to_numpy())
    ra, rb = a.random_effects, b.random_effects
    assert list(ra) == list(rb)
    for key in ra:
        np.testing.assert_array_equal(np.asarray(ra[key]), np.asarray(rb[key]))
    if rows:
        np.testing.assert_array_equal(a.fittedvalues, b.fittedvalues)
        np.testing.assert_array_equal(a.predict(), b.predict())
    assert str(a.summary()) == str(b.summary())


FITS: dict[str, Callable[[], lmefast.MixedLMResults]] = {
    "one factor": lambda: lmefast.mixedlm("Weight ~ Time", datasets.load_dietox(), groups="Pig",
                                          re_formula="~Time").fit(),
    "variance components": lambda: lmefast.mixedlm(
        "strength ~ 1", datasets.load_pastes(), groups="batch", re_formula="1",
        vc_formula={"cask": "0 + C(cask)"}).fit(reml=False),
    "several factors": lambda: lmefast.lmer("strength ~ 1 + (1 | batch) + (1 | cask)", datasets.load_pastes()),
    "crossed, statsmodels' spelling": lambda: lmefast.mixedlm(
        "strength ~ 1", datasets.load_pastes().assign(one=1), groups="one", re_formula="0",
        vc_formula={"batch": "0 + C(batch)", "cask": "0 + C(cask)"}).fit(),
}


@pytest.mark.parametrize("name", list(FITS))
def test_in_memory_fits_round_trip(name: str) -> None:
    res = FITS[name]()
    res.coef_table(ddf="satterthwaite")        # derived parts made before pickling
    for back in _round_trips(res):
        _same(res, back)
        pd.testing.assert_frame_equal(back.coef_table(ddf="satterthwaite"), res.coef_table(ddf="satterthwaite"))
    for model in _round_trips(res.model):
        _same(model.fit(reml=res.reml), res)


def test_the_rebuilt_objective_is_the_fit_s() -> None:
    res = FITS["one factor"]()
    back = pickle.loads(pickle.dumps(res))
    assert back._objective is not res._objective and back.reml == res.reml
    assert back._objective.solve(res.theta).objective == pytest.approx(res.objective, rel=1e-14)


@pytest.mark.slow
def test_parquet_and_dask_fits_round_trip(tmp_path: Path) -> None:
    dd = pytest.importorskip("dask.dataframe")
    df = datasets.load_dietox()
    path = tmp_path / "dietox.parquet"
    df.to_parquet(path, row_group_size=200, index=False)
    for data in (str(path), dd.from_pandas(df, npartitions=3)):
        res = lmefast.mixedlm("Weight ~ Time", data, groups="Pig", re_formula="~Time").fit()
        for back in _round_trips(res):
            _same(res, back, rows=False)
            np.testing.assert_array_equal(np.asarray(back.predict(df.iloc[:20], include_random=True)),
                                          np.asarray(res.predict(df.iloc[:20], include_random=True)))
