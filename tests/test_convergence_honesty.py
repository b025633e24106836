"""Issue 10 item 2: `converged` only when the final test passed at a finite objective; a start that
cannot start the fit falls back to the default start with a warning; a fit from a given start
that stopped at a worse point (an entry that never moved) is checked against the default start."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import load_reference

import lmefast
from lmefast.datasets import load_sleepstudy


@pytest.fixture(scope="module")
def model() -> lmefast.MixedLM:
    return lmefast.mixedlm("Reaction ~ Days", load_sleepstudy(), groups="Subject", re_formula="~Days")


@pytest.mark.parametrize(("start", "message"), [
    ([1e300, 0.0, 1.0], "cannot start the fit"),
    ([np.nan, 0.0, 1.0], "cannot start the fit"),
    ([1e6, 0.0, 1.0], "stopped at a worse point"),
])
def test_bad_starts_reach_the_optimum_and_say_so(model: lmefast.MixedLM, start: list, message: str) -> None:
    ref = load_reference("sleep_rs", False)
    with pytest.warns(UserWarning, match=message):
        res = model.fit(reml=False, start_theta=start)
    assert res.converged and np.isfinite(res.llf)
    assert res.llf == pytest.approx(ref.loglik, rel=1e-8)


def test_stopped_runs_are_not_converged(model: lmefast.MixedLM) -> None:
    with pytest.warns(UserWarning):
        res = model.fit(maxiter=1)
    assert not res.converged
    ref = load_reference("sleep_rs", True)
    assert model.fit().llf == pytest.approx(ref.loglik, rel=1e-8)
