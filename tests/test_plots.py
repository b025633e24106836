"""Plots of a fit (lmefast.plots) rendered with the Agg backend: their content (panels, points,
intervals), not their pixels."""
from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest

import lmefast
from lmefast.datasets import load_penicillin, load_sleepstudy

matplotlib.use("Agg")


def _render(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sleep():
    return lmefast.lmer("Reaction ~ Days + (Days | Subject)", load_sleepstudy())


def test_caterpillar_has_a_panel_per_coefficient_with_modes_and_intervals(sleep) -> None:
    fig = sleep.plot("caterpillar")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["Subject: (Intercept)", "Subject: Days"]
    modes = sleep.random_effects["Subject"]
    cv = sleep.random_effects_cov["Subject"]
    for j, ax in enumerate(axes):
        points = ax.lines[0].get_xdata()
        np.testing.assert_allclose(points, np.sort(modes.iloc[:, j].to_numpy()))
        # the interval bars: half-widths z·sd of the sorted levels
        segments = ax.collections[0].get_segments()
        half = np.array([abs(s[1][0] - s[0][0]) / 2 for s in segments])
        order = np.argsort(modes.iloc[:, j].to_numpy())
        np.testing.assert_allclose(half, 1.959964 * np.sqrt(cv[order, j, j]), rtol=1e-5)
    assert _render(fig).startswith(b"\x89PNG")


def test_caterpillar_of_crossed_factors_and_qq() -> None:
    res = lmefast.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", load_penicillin())
    fig = res.plot("caterpillar")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["plate: (Intercept)", "sample: (Intercept)"]
    assert [len(ax.lines[0].get_xdata()) for ax in fig.axes if ax.get_visible()] == [24, 6]
    q = res.plot("qq")
    assert [len(ax.lines[0].get_xdata()) for ax in q.axes if ax.get_visible()] == [24, 6]


def test_residuals_and_profile(sleep) -> None:
    fig = sleep.plot("residuals")
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], sleep.fittedvalues)
    np.testing.assert_allclose(offsets[:, 1], sleep.resid)
    prof = sleep.plot("profile", parm="sigma")
    ax = prof.axes[0]
    assert ax.get_xlabel() == "sigma"
    zeta = ax.lines[0].get_ydata()
    assert zeta.min() < -2.5 and zeta.max() > 2.5 and np.all(np.diff(zeta) > 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        sleep.plot("pie")
