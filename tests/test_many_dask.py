"""fit_many with the responses in a Dask array or DataFrame: blocks of columns fitted on the
workers give the same results as the in-memory fit_many (the same code on each block)."""
from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from test_many import crossed_data, sleep_responses

import lmefast
from lmefast import SpecificationError
from lmefast.many import fit_many_dask


def same_results(a: lmefast.ManyResults, b: lmefast.ManyResults) -> None:
    """The same fits: the response parts of a block of columns are one product whose last bits
    depend on the block's width, so θ̂ agrees to the optimiser's resolution, not bitwise."""
    assert a.names == b.names
    pd.testing.assert_frame_equal(a.status().drop(columns="llf"), b.status().drop(columns="llf"))
    np.testing.assert_allclose(a.llf.to_numpy(), b.llf.to_numpy(), rtol=1e-10)
    pd.testing.assert_frame_equal(a.coef_table(), b.coef_table(), rtol=1e-6)
    pd.testing.assert_frame_equal(a.varcorr(), b.varcorr(), rtol=1e-6)


def test_dask_array_blocks_equal_in_memory() -> None:
    data, Y = crossed_data(m=5, seed=3)
    Y.iloc[[2, 8], 3] = np.nan
    Y.iloc[:, 4] = 1.0                                  # constant: reported, not raised
    rhs = "~ trait + age + (1 | donor) + (1 | batch)"
    mem = lmefast.fit_many(rhs, data, Y.to_numpy())
    big = lmefast.fit_many(rhs, data, da.from_array(Y.to_numpy(), chunks=(40, 3)))
    same_results(big, mem)
    assert not big.fitted["y4"]
    assert big.result("y3").llf == pytest.approx(mem.result("y3").llf, rel=1e-10)
    blocks = fit_many_dask(rhs, data, da.from_array(Y.to_numpy()), block=2, client=False)
    same_results(blocks, mem)


def test_dask_dataframe_with_per_response_weights_and_shared_zero_weights() -> None:
    data, Y = sleep_responses(m=4)
    rng = np.random.default_rng(1)
    W = rng.uniform(0.5, 2.0, Y.shape)
    rhs = "~ Days + (Days | Subject)"
    mem = lmefast.fit_many(rhs, data, Y, weights=W)
    big = lmefast.fit_many(rhs, data, dd.from_pandas(Y, npartitions=3), weights=da.from_array(W))
    same_results(big, mem)
    w = rng.uniform(0.5, 2.0, len(data))
    w[:4] = 0.0
    mem = lmefast.fit_many(rhs, data, Y, weights=w)
    big = lmefast.fit_many(rhs, data, dd.from_pandas(Y, npartitions=3), weights=w)
    same_results(big, mem)
    assert big.result("r2").llf == pytest.approx(mem.result("r2").llf, rel=1e-10)
    with pytest.raises(SpecificationError, match="rows"):
        lmefast.fit_many(rhs, data, da.zeros((10, 3)))


def test_distributed_client_and_progress() -> None:
    data, Y = sleep_responses(m=6)
    rhs = "~ Days + (1 | Subject)"
    mem = lmefast.fit_many(rhs, data, Y.to_numpy())
    seen: list[tuple[str, int, int]] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        big = fit_many_dask(rhs, data, da.from_array(Y.to_numpy()), block=2, client=client,
                                    progress=lambda *a: seen.append(a))
    same_results(big, mem)
    assert seen[0] == ("response blocks", 0, 3) and seen[-1] == ("response blocks", 3, 3)
