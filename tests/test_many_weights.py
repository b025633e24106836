"""fit_many with per-response prior weights (an n × m matrix, voom/dream's precision weights):
every response equals a separate weighted lmer fit; zero weights drop rows of that response."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_many import assert_same_as_lmer, crossed_data, sleep_responses

import lmefast
from lmefast.errors import SpecificationError


def weighted_ref(rhs: str, data: pd.DataFrame, y: np.ndarray, w: np.ndarray, reml: bool = True,
                 offset: np.ndarray | None = None):
    d = data.assign(y=y, w=w)
    kw = {} if offset is None else {"offset": offset}
    return lmefast.lmer(f"y ~ {rhs}", d, reml=reml, weights="w", missing="drop", **kw)


@pytest.mark.parametrize("reml", [True, False])
def test_per_response_weights_one_factor_equal_lmer(reml: bool) -> None:
    data, Y = sleep_responses(m=4, seed=5)
    rng = np.random.default_rng(3)
    W = rng.uniform(0.2, 4.0, Y.shape)
    rhs = "Days + (Days | Subject)"
    res = lmefast.fit_many(f"~ {rhs}", data, Y, weights=W, reml=reml)
    for j, name in enumerate(Y.columns):
        assert_same_as_lmer(res, name, weighted_ref(rhs, data, Y[name].to_numpy(), W[:, j], reml))
    # the weights matter: unweighted fits differ
    plain = lmefast.fit_many(f"~ {rhs}", data, Y, reml=reml)
    assert np.all(np.abs(plain.llf.to_numpy() - res.llf.to_numpy()) > 1e-3)


def test_per_response_weights_crossed_with_offset_zero_weights_and_missing() -> None:
    data, Y = crossed_data(m=4, seed=21)
    n = len(data)
    rng = np.random.default_rng(8)
    W = rng.uniform(0.3, 3.0, (n, 4))
    W[[0, 5, 7], 1] = 0.0            # zero weights: rows dropped for response 1 only
    W[:, 3] = W[:, 2]                # two responses with the same weights
    Y.iloc[[3, 11], 2] = np.nan      # missing values of response 2 only
    off = rng.normal(0, 0.3, n)
    rhs = "trait + age + (1 | donor) + (1 | batch)"
    wdf = pd.DataFrame(W, columns=Y.columns)[list(Y.columns[::-1])]   # matched by name
    res = lmefast.fit_many(f"~ {rhs}", data, Y, weights=wdf, offset=off, n_threads=2)
    st = res.status()
    assert st.nobs.tolist() == [n, n - 3, n - 2, n]
    assert st.dropped_zero_weight.tolist() == [0, 3, 0, 0]
    assert st.dropped_missing.tolist() == [0, 0, 2, 0]
    for j, name in enumerate(Y.columns):
        ref = weighted_ref(rhs, data, Y[name].to_numpy(), W[:, j], offset=off)
        assert ref.nobs == st.nobs[name]
        assert_same_as_lmer(res, name, ref)
        assert res.result(name).llf == pytest.approx(ref.llf, rel=1e-10)


def test_per_response_weights_bad_input_and_all_zero() -> None:
    data, Y = sleep_responses(m=3)
    n = len(data)
    W = np.ones((n, 3))
    W[:, 1] = 0.0
    res = lmefast.fit_many("~ Days + (1 | Subject)", data, Y, weights=W)
    assert not res.fitted["r1"] and "zero" in res.status().reason["r1"]
    assert res.fitted["r0"] and res.fitted["r2"]
    with pytest.raises(SpecificationError, match="n × m"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y, weights=W[:, :2])
    W[0, 0] = -1.0
    with pytest.raises(SpecificationError, match="non-negative"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y, weights=W)
    with pytest.raises(SpecificationError, match="names"):
        lmefast.fit_many("~ Days + (1 | Subject)", data, Y,
                         weights=pd.DataFrame(np.ones((n, 3)), columns=["a", "b", "c"]))
