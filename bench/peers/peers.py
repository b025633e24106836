"""Timing harness for the peers that lmefast is benchmarked against.

Three peers, each behind one function with the same contract:

* :func:`time_statsmodels` -- ``statsmodels.formula.api.mixedlm``;
* :func:`time_mixedlm_rs` -- the ``mixedlm-rs`` package (PyPI), whose public API
  is a drop-in copy of statsmodels' (``mixedlm_rs.mixedlm(formula, data,
  groups=, re_formula=).fit(reml=)``); it supports one grouping factor with a
  random intercept and/or random slopes (``re_formula``), but **no**
  ``vc_formula`` / variance components (it raises ``NotImplementedError``);
* :func:`time_lme4` -- R's ``lme4::lmer`` run through ``Rscript lme4_time.R``.

Every function returns ``None`` when the peer is not installed, and otherwise a
dict with at least ``peer``, ``median_s``, ``times`` and ``llf`` (plus
``fe_params``, ``converged``, ``version``, ...). A peer that fails, or that runs
past its ``timeout``, gives a dict with an ``error`` field (and ``median_s`` /
``llf`` set to ``None``) instead of raising.

The timed region is everything from the formula to the fitted result: formula
parsing and design construction are included, for all three peers. Unless
``warmup=False``, one untimed fit runs first (imports, lazy initialisation).

Timing caveat (measured on the 2-core dev machine): with the default OpenBLAS
threading, small-model fits that go through scipy (mixedlm-rs' default
L-BFGS-B, statsmodels) are intermittently ~10x slower (e.g. 55 ms instead of
5 ms for sleepstudy), apparently thread-pool contention between numpy's and
scipy's bundled OpenBLAS. ``OPENBLAS_NUM_THREADS=1`` removes it (and did not
slow the 1e6-row fits), so run benchmarks with it set; each result records the
thread variables in force under ``thread_env``.

Run as a script for a quick check on the reference data::

    OPENBLAS_NUM_THREADS=1 python bench/peers/peers.py [--big]
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PeerResult = dict[str, Any]

HERE = Path(__file__).resolve().parent
LME4_SCRIPT = HERE / "lme4_time.R"

__all__ = [
    "LME4_SCRIPT",
    "PeerResult",
    "available_peers",
    "synthetic_random_slopes",
    "time_lme4",
    "time_mixedlm_rs",
    "time_statsmodels",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_peers() -> dict[str, bool]:
    """Which peers can run on this machine."""
    return {
        "statsmodels": _has_module("statsmodels"),
        "mixedlm_rs": _has_module("mixedlm_rs"),
        "lme4": shutil.which("Rscript") is not None,
    }


_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")


def _thread_env() -> dict[str, str]:
    """Thread-count environment variables in force (they change timings)."""
    return {k: os.environ[k] for k in _THREAD_VARS if k in os.environ}


def _error(peer: str, message: str, **extra: Any) -> PeerResult:
    out: PeerResult = {
        "peer": peer,
        "median_s": None,
        "times": [],
        "llf": None,
        "error": message,
    }
    out.update(extra)
    return out


def _short_warnings(caught: list[warnings.WarningMessage], limit: int = 5) -> list[str]:
    seen: list[str] = []
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
        if msg not in seen:
            seen.append(msg)
        if len(seen) >= limit:
            break
    return seen


def _time_reps(
    peer: str,
    fit_once: Callable[[], Any],
    summarise: Callable[[Any], PeerResult],
    reps: int,
    warmup: bool,
    budget_s: float | None,
) -> PeerResult:
    """Run ``fit_once`` (optionally once untimed, then ``reps`` times timed).

    Stops early (keeping at least one timed run) once the timed runs have used
    ``budget_s`` seconds. Exceptions become an ``error`` result.
    """
    times: list[float] = []
    result: Any = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if warmup:
                result = fit_once()
            for _ in range(max(1, reps)):
                gc.collect()
                t0 = time.perf_counter()
                result = fit_once()
                times.append(time.perf_counter() - t0)
                if budget_s is not None and sum(times) > budget_s:
                    break
        out: PeerResult = {
            "peer": peer,
            "median_s": statistics.median(times),
            "times": times,
            "n_reps": len(times),
            "warmup": warmup,
            "thread_env": _thread_env(),
        }
        out.update(summarise(result))
        out["warnings"] = _short_warnings(caught)
        return out
    except Exception as exc:  # a peer failure must not take the benchmark down
        return _error(
            peer,
            f"{type(exc).__name__}: {exc}",
            times=times,
            traceback=traceback.format_exc(limit=5),
        )


def _child_entry(conn: Any, fn: Callable[..., PeerResult], kwargs: dict[str, Any]) -> None:
    try:
        res = fn(**kwargs)
    except BaseException as exc:  # report anything, including SystemExit
        res = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        conn.send(res)
    finally:
        conn.close()


def _run_with_timeout(
    peer: str, fn: Callable[..., PeerResult], kwargs: dict[str, Any], timeout: float
) -> PeerResult:
    """Run ``fn(**kwargs)`` in a forked child; kill it after ``timeout`` s."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(send, fn, kwargs), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            try:
                res: PeerResult = recv.recv()
            except EOFError:
                proc.join(5)
                return _error(peer, f"child process died (exit code {proc.exitcode})")
            proc.join(30)
            return res
        return _error(
            peer,
            f"timeout: no result after {timeout:g} s",
            timed_out=True,
            elapsed_s=time.perf_counter() - t0,
        )
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def _fe_dict(names: list[str] | None, values: Any) -> dict[str, float]:
    vals = np.asarray(values, dtype=float).ravel()
    if names is None or len(names) != len(vals):
        names = [f"b{i}" for i in range(len(vals))]
    return {str(n): float(v) for n, v in zip(names, vals, strict=True)}


def _float_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------
# statsmodels
# --------------------------------------------------------------------------
def _statsmodels_impl(
    df: pd.DataFrame,
    formula: str,
    groups: str,
    re_formula: str | None,
    vc_formula: dict[str, str] | None,
    reml: bool,
    reps: int,
    warmup: bool,
    budget_s: float | None,
    fit_kwargs: dict[str, Any] | None,
) -> PeerResult:
    import statsmodels
    import statsmodels.formula.api as smf

    kw = dict(fit_kwargs or {})

    def fit_once() -> Any:
        model = smf.mixedlm(
            formula, df, groups=groups, re_formula=re_formula, vc_formula=vc_formula
        )
        return model.fit(reml=reml, **kw)

    def summarise(res: Any) -> PeerResult:
        return {
            "llf": _float_or_none(res.llf),
            "fe_params": _fe_dict(list(res.model.exog_names), res.fe_params),
            "converged": bool(getattr(res, "converged", True)),
            "version": statsmodels.__version__,
        }

    return _time_reps("statsmodels", fit_once, summarise, reps, warmup, budget_s)


def time_statsmodels(
    df: pd.DataFrame,
    formula: str,
    groups: str,
    re_formula: str | None = None,
    vc_formula: dict[str, str] | None = None,
    reml: bool = True,
    reps: int = 5,
    *,
    warmup: bool = True,
    timeout: float | None = None,
    budget_s: float | None = None,
    fit_kwargs: dict[str, Any] | None = None,
) -> PeerResult | None:
    """Time ``statsmodels.formula.api.mixedlm(...).fit(reml=...)``.

    ``formula`` is the fixed part (``"y ~ x1 + x2"``), ``groups`` the grouping
    column, ``re_formula`` the random part (``"~x1"``; ``None`` = intercept).
    ``timeout`` (seconds) runs the whole thing, warm-up included, in a forked
    child that is killed on expiry; ``budget_s`` stops repeating once the timed
    fits have used that many seconds. Returns ``None`` if statsmodels is absent.
    """
    if not _has_module("statsmodels"):
        return None
    kwargs: dict[str, Any] = {
        "df": df,
        "formula": formula,
        "groups": groups,
        "re_formula": re_formula,
        "vc_formula": vc_formula,
        "reml": reml,
        "reps": reps,
        "warmup": warmup,
        "budget_s": budget_s,
        "fit_kwargs": fit_kwargs,
    }
    if timeout is not None:
        return _run_with_timeout("statsmodels", _statsmodels_impl, kwargs, timeout)
    return _statsmodels_impl(**kwargs)


# --------------------------------------------------------------------------
# mixedlm-rs
# --------------------------------------------------------------------------
def _mixedlm_rs_impl(
    df: pd.DataFrame,
    formula: str,
    groups: str,
    re_formula: str | None,
    reml: bool,
    reps: int,
    warmup: bool,
    budget_s: float | None,
    fit_kwargs: dict[str, Any] | None,
) -> PeerResult:
    import mixedlm_rs

    kw = dict(fit_kwargs or {})

    def fit_once() -> Any:
        model = mixedlm_rs.mixedlm(formula, df, groups=groups, re_formula=re_formula)
        return model.fit(reml=reml, **kw)

    def summarise(res: Any) -> PeerResult:
        return {
            "llf": _float_or_none(res.llf),
            "fe_params": _fe_dict(list(res.model.exog_names), res.fe_params),
            "converged": bool(getattr(res, "converged", True)),
            "singular": bool(getattr(res, "singular", False)),
            "method": str(getattr(res, "method", "")),
            "diagnostics": _rs_diagnostics(res),
            "version": str(mixedlm_rs.__version__),
        }

    return _time_reps("mixedlm_rs", fit_once, summarise, reps, warmup, budget_s)


def _rs_diagnostics(res: Any) -> dict[str, Any]:
    """mixedlm-rs' optimiser report (method, iterations, starts), JSON-safe."""
    try:
        diag = res.diagnostics
        diag = diag() if callable(diag) else diag
        return {str(k): v for k, v in dict(diag).items() if isinstance(v, (str, int, float, bool))}
    except Exception:
        return {}


def time_mixedlm_rs(
    df: pd.DataFrame,
    formula: str,
    groups: str,
    re_formula: str | None = None,
    reml: bool = True,
    reps: int = 5,
    *,
    warmup: bool = True,
    timeout: float | None = None,
    budget_s: float | None = None,
    fit_kwargs: dict[str, Any] | None = None,
) -> PeerResult | None:
    """Time ``mixedlm_rs.mixedlm(formula, df, groups=, re_formula=).fit(reml=)``.

    mixedlm-rs mirrors statsmodels' formula API (patsy formulas, one grouping
    factor, ``re_formula`` for random slopes, no ``vc_formula``). ``fit_kwargs``
    go to ``.fit`` (e.g. ``{"method": "rust"}`` for its in-crate L-BFGS instead
    of the default scipy L-BFGS-B). Same ``timeout`` / ``budget_s`` semantics
    as :func:`time_statsmodels`. Returns ``None`` if mixedlm-rs is absent.
    """
    if not _has_module("mixedlm_rs"):
        return None
    kwargs: dict[str, Any] = {
        "df": df,
        "formula": formula,
        "groups": groups,
        "re_formula": re_formula,
        "reml": reml,
        "reps": reps,
        "warmup": warmup,
        "budget_s": budget_s,
        "fit_kwargs": fit_kwargs,
    }
    if timeout is not None:
        return _run_with_timeout("mixedlm_rs", _mixedlm_rs_impl, kwargs, timeout)
    return _mixedlm_rs_impl(**kwargs)


# --------------------------------------------------------------------------
# lme4 (R)
# --------------------------------------------------------------------------
def _factor_columns(df: pd.DataFrame) -> list[str]:
    """Columns that R should read as factors (anything not numeric/bool)."""
    return [
        str(c)
        for c in df.columns
        if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))
    ]


def time_lme4(
    df: pd.DataFrame,
    lme4_formula: str,
    reml: bool = True,
    reps: int = 5,
    timeout: float | None = 3600.0,
    *,
    factors: list[str] | None = None,
    columns: list[str] | None = None,
    rscript: str | None = None,
) -> PeerResult | None:
    """Time ``lme4::lmer(lme4_formula, data, REML=reml)`` via ``Rscript``.

    ``df`` is written to a temporary CSV and ``lme4_time.R`` is run on it: one
    untimed warm-up fit then ``reps`` timed fits (``reps=0`` times the warm-up
    fit alone -- one fit in total, for very large models). Columns that are not
    numeric are passed to R as factors (override with ``factors``); ``columns``
    restricts what is written. R startup, CSV writing and reading are *not* in
    the timed region; ``lmer`` itself (model frame and design construction
    included) is. Returns ``None`` if ``Rscript`` is not on ``PATH``; an
    ``error`` dict if R fails, lme4 is missing, or ``timeout`` expires.
    """
    exe = rscript or shutil.which("Rscript")
    if exe is None:
        return None
    if not LME4_SCRIPT.exists():
        return _error("lme4", f"missing {LME4_SCRIPT}")
    data = df if columns is None else df[columns]
    facs = _factor_columns(data) if factors is None else list(factors)
    with tempfile.TemporaryDirectory(prefix="lmefast-lme4-") as tmp:
        csv_path = Path(tmp) / "data.csv"
        json_path = Path(tmp) / "out.json"
        t0 = time.perf_counter()
        try:
            data.to_csv(csv_path, index=False)
        except Exception as exc:
            return _error("lme4", f"could not write CSV: {type(exc).__name__}: {exc}")
        write_s = time.perf_counter() - t0
        cmd = [
            exe,
            "--vanilla",
            str(LME4_SCRIPT),
            str(csv_path),
            lme4_formula,
            "TRUE" if reml else "FALSE",
            str(int(reps)),
            str(json_path),
            ",".join(facs),
        ]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return _error("lme4", f"timeout: no result after {timeout:g} s", timed_out=True)
        except OSError as exc:
            return _error("lme4", f"could not run Rscript: {exc}")
        wall_s = time.perf_counter() - t0
        if proc.returncode != 0 or not json_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            return _error("lme4", f"Rscript exited {proc.returncode}: {tail}")
        try:
            raw = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            return _error("lme4", f"could not parse lme4 output: {exc}")
    times = [float(t) for t in np.atleast_1d(raw.get("times", []))]
    out: PeerResult = {
        "peer": "lme4",
        "median_s": _float_or_none(raw.get("median_s")),
        "times": times,
        "n_reps": len(times),
        "warmup": bool(reps > 0),
        "llf": _float_or_none(raw.get("logLik")),
        "fe_params": {str(k): float(v) for k, v in (raw.get("fixef") or {}).items()},
        "converged": not raw.get("conv_messages") and not raw.get("warnings"),
        "version": (raw.get("versions") or {}).get("lme4"),
        "thread_env": _thread_env(),
        "csv_write_s": write_s,
        "rscript_wall_s": wall_s,
        "raw": raw,
    }
    return out


# --------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------
def synthetic_random_slopes(
    n_rows: int = 1_000_000, n_groups: int = 100_000, seed: int = 1, string_keys: bool = True
) -> pd.DataFrame:
    """``y ~ x1 + x2 + (1 + x1 | g)`` data (lmefast._testing.random_slopes, the tests' generator);
    ``g`` is a string column ("g123"), or the integer itself with ``string_keys=False``."""
    from lmefast._testing import random_slopes

    return random_slopes(n_rows, n_groups, seed, string_keys)


# --------------------------------------------------------------------------
# command line check
# --------------------------------------------------------------------------
def _fmt(res: PeerResult | None) -> str:
    if res is None:
        return "not installed"
    if res.get("error"):
        return "ERROR " + str(res["error"]).splitlines()[0][:150]
    llf = res.get("llf")
    llf_s = f"{llf:.4f}" if llf is not None else "nan"
    conv = "" if res.get("converged", True) else "  (NOT converged)"
    return f"median {res['median_s']:.4f} s over {res['n_reps']} reps  llf {llf_s}{conv}"


def main(argv: list[str]) -> int:
    data_dir = Path(os.environ.get("LMEFAST_REF_DATA", HERE.parent.parent / "tests" / "data"))
    print("peers available:", available_peers())
    cases: list[tuple[str, pd.DataFrame, str, str, str | None, str]] = []
    if (data_dir / "sleepstudy.csv").exists():
        ss = pd.read_csv(data_dir / "sleepstudy.csv", dtype={"Subject": str})
        cases.append(
            (
                "sleepstudy",
                ss,
                "Reaction ~ Days",
                "Subject",
                "~Days",
                "Reaction ~ Days + (Days | Subject)",
            )
        )
    if (data_dir / "dietox.csv").exists():
        dx = pd.read_csv(data_dir / "dietox.csv", dtype={"Pig": str})
        dx = dx[["Weight", "Time", "Pig"]]
        cases.append(
            ("dietox", dx, "Weight ~ Time", "Pig", "~Time", "Weight ~ Time + (1 + Time | Pig)")
        )
    rust = {"method": "rust"}
    for reml in (True, False):
        for name, df, f, g, re_f, lf in cases:
            tag = f"{name} REML={reml}"
            rows: list[tuple[str, PeerResult | None]] = [
                ("statsmodels", time_statsmodels(df, f, g, re_f, reml=reml)),
                ("mixedlm_rs", time_mixedlm_rs(df, f, g, re_f, reml=reml)),
                ("mixedlm_rs[rust]", time_mixedlm_rs(df, f, g, re_f, reml=reml, fit_kwargs=rust)),
                ("lme4", time_lme4(df, lf, reml=reml)),
            ]
            for peer, res in rows:
                print(f"{tag:24s} {peer:17s} {_fmt(res)}", flush=True)
    if "--big" in argv:
        sm_timeout = float(os.environ.get("LMEFAST_SM_TIMEOUT", "300"))
        df = synthetic_random_slopes()
        tag = "synthetic 1e6/1e5 REML"
        f, g, re_f = "y ~ x1 + x2", "g", "~x1"
        lf = "y ~ x1 + x2 + (1 + x1 | g)"
        big: list[tuple[str, Callable[[], PeerResult | None]]] = [
            ("mixedlm_rs", lambda: time_mixedlm_rs(df, f, g, re_f, reps=3, warmup=False)),
            (
                "mixedlm_rs[rust]",
                lambda: time_mixedlm_rs(df, f, g, re_f, reps=3, warmup=False, fit_kwargs=rust),
            ),
            ("lme4", lambda: time_lme4(df, lf, reps=0)),
            (
                "statsmodels",
                lambda: time_statsmodels(df, f, g, re_f, reps=1, warmup=False, timeout=sm_timeout),
            ),
        ]
        for peer, run in big:
            print(f"{tag:24s} {peer:17s} {_fmt(run())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
