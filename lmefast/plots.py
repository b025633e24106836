"""Pictures of a fit (matplotlib, an optional extra: ``pip install "lmefast[plot]"``).

* ``caterpillar``: the conditional modes of each grouping factor's coefficients, sorted, with
  intervals ± z·sd from the conditional variances (lme4's ``dotplot(ranef(fit, condVar=TRUE))``);
* ``profile_traces``: ζ against each parameter's value (lme4's ``xyplot(profile(fit))``);
* ``residuals``: residuals against fitted values;
* ``qq``: normal quantile plots of the conditional modes.

Each returns a matplotlib Figure; nothing is shown or saved here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults

KINDS = ("caterpillar", "profile", "residuals", "qq")


def _pyplot() -> Any:
    try:
        from matplotlib import pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "lmefast[plot]"') from None
    return plt


def _panels(n: int, plt: Any, width: float = 4.0, height: float = 3.2) -> tuple[Any, list]:
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _modes_and_condvar(res: MixedLMResults) -> tuple[dict, dict]:
    engine = res.engine
    return (engine.modes_by_factor(res._objective, res._sol),
            engine.condvar_by_factor(res._objective, res._sol))


def caterpillar(res: MixedLMResults, level: float = 0.95, max_levels: int = 200) -> Any:
    """One panel per grouping factor and coefficient: modes sorted, ± z sd intervals (at most
    ``max_levels`` levels per panel, evenly chosen, when a factor has more)."""
    plt = _pyplot()
    modes, condvar = _modes_and_condvar(res)
    z = stats.norm.ppf(0.5 + level / 2)
    panels = [(f, j, c) for f, frame in modes.items() for j, c in enumerate(frame.columns)]
    fig, axes = _panels(len(panels), plt, height=max(3.2, min(12.0, 0.12 * min(max_levels, 60) + 1.5)))
    for ax, (factor, j, coef) in zip(axes, panels, strict=True):
        values = modes[factor][coef].to_numpy()
        cv = condvar[factor]
        sd = np.sqrt(np.maximum(cv[:, j, j], 0.0)) if cv.shape[1] > j else np.zeros_like(values)
        order = np.argsort(values)
        if order.size > max_levels:
            order = order[np.linspace(0, order.size - 1, max_levels).round().astype(int)]
        y = np.arange(order.size)
        ax.errorbar(values[order], y, xerr=z * sd[order], fmt="o", ms=3, lw=0.8, capsize=0)
        ax.axvline(0.0, color="0.6", lw=0.8)
        if order.size <= 60:
            labels = modes[factor].index.to_numpy()[order]
            ax.set_yticks(y, labels=[str(v) for v in labels], fontsize=7)
        else:
            ax.set_yticks([])
        ax.set_xlabel(coef)
        ax.set_title(f"{factor}: {coef}")
    fig.tight_layout()
    return fig


def profile_traces(res: MixedLMResults, parm: Any = None) -> Any:
    """ζ against the value of each parameter (from ``res.profile``), with the 95% and 99% cut-offs."""
    plt = _pyplot()
    table = res.profile(parm)
    names = list(dict.fromkeys(table["parameter"]))
    fig, axes = _panels(len(names), plt)
    for ax, name in zip(axes, names, strict=True):
        part = table[table["parameter"] == name]
        ax.plot(part["value"], part["zeta"], "-o", ms=2.5, lw=1)
        for cut in (stats.norm.ppf(0.975), stats.norm.ppf(0.995)):
            ax.axhline(cut, color="0.7", lw=0.7, ls="--")
            ax.axhline(-cut, color="0.7", lw=0.7, ls="--")
        ax.set_xlabel(name)
        ax.set_ylabel("ζ")
    fig.tight_layout()
    return fig


def residuals(res: MixedLMResults) -> Any:
    """Residuals against fitted values (the rows of the fit; not for data fitted in chunks)."""
    plt = _pyplot()
    fitted, resid = np.asarray(res.fittedvalues, dtype=float), np.asarray(res.resid, dtype=float)
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    ax.scatter(fitted, resid, s=6, alpha=0.6)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("fitted values")
    ax.set_ylabel("residuals")
    fig.tight_layout()
    return fig


def qq(res: MixedLMResults) -> Any:
    """Normal quantile plot of the conditional modes, one panel per factor and coefficient."""
    plt = _pyplot()
    modes, _ = _modes_and_condvar(res)
    panels = [(f, c) for f, frame in modes.items() for c in frame.columns]
    fig, axes = _panels(len(panels), plt)
    for ax, (factor, coef) in zip(axes, panels, strict=True):
        values = np.sort(modes[factor][coef].to_numpy())
        q = stats.norm.ppf((np.arange(values.size) + 0.5) / values.size)
        ax.plot(q, values, "o", ms=3)
        sd = values.std()
        ax.plot(q, values.mean() + sd * q, color="0.6", lw=0.8)
        ax.set_xlabel("normal quantiles")
        ax.set_ylabel(coef)
        ax.set_title(f"{factor}: {coef}")
    fig.tight_layout()
    return fig


def plot(res: MixedLMResults, kind: str = "caterpillar", **kwargs: Any) -> Any:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    draw = {"caterpillar": caterpillar, "profile": profile_traces, "residuals": residuals, "qq": qq}[kind]
    return draw(res, **kwargs)
