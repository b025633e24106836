"""Core-engine benchmark (issue: one grouping factor): lmefast against its peers, same data,
same machine, one run. Medians and ratios.

    OPENBLAS_NUM_THREADS=1 python bench/compare_core.py [--small] [--big] [--huge]
        [--lme4-big] [--reps N] [--out bench/out/core.json]

--small  dietox and sleepstudy: lmefast from arrays and from a DataFrame with a formula,
         statsmodels, mixedlm-rs, lme4 (Rscript) when installed.
--big    y ~ x1 + x2, random intercept and slope on x1, 1,000,000 rows, 100,000 groups:
         lmefast from a DataFrame (time and peak traced memory), mixedlm-rs; lme4 and
         statsmodels only with --lme4-big / --sm-big (about 30 s and 120 s here).
--huge   the same model on 10,000,000 rows and 1,000,000 groups: lmefast and mixedlm-rs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS; not when imported by another bench
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import lmefast  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import peers  # noqa: E402

DATA = HERE.parent / "tests" / "data"

SMALL = [
    # id, csv, statsmodels formula, groups, re_formula, lme4 formula
    ("sleepstudy", "sleepstudy.csv", "Reaction ~ Days", "Subject", "~Days",
     "Reaction ~ Days + (Days|Subject)"),
    ("dietox", "dietox.csv", "Weight ~ Time", "Pig", "~Time", "Weight ~ Time + (1 + Time|Pig)"),
]


def median_time(fn, reps: int, budget_s: float = 20.0) -> tuple[float, int]:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


def synthetic(n_rows: int, n_groups: int, seed: int = 1) -> pd.DataFrame:
    """y ~ x1 + x2 + (1 + x1 | g), rows in random group order, integer group keys."""
    return peers.synthetic_random_slopes(n_rows, n_groups, seed, string_keys=False)


def lmefast_big(df: pd.DataFrame, reps: int) -> dict:
    def fit():
        return lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1").fit()

    res = fit()
    med, n = median_time(fit, reps, budget_s=60)
    tracemalloc.start()
    fit()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data_bytes = int(df.memory_usage(deep=True).sum())
    return {"median_s": med, "n_reps": n, "llf": res.llf, "converged": res.converged,
            "n_evals": res.optsummary.n_evals, "peak_traced_bytes": peak,
            "data_bytes": data_bytes, "peak_over_data": peak / data_bytes}


def run_record() -> dict:
    """Machine and date for a benchmark's JSON output."""
    return {"machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                        "cores": os.cpu_count(), "lmefast": lmefast.__version__,
                        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_output(out: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


def run_small(reps: int) -> list[dict]:
    rows = []
    for name, csv, formula, groups, re_formula, lme4_formula in SMALL:
        df = pd.read_csv(DATA / csv)
        y = df[formula.split("~")[0].strip()].to_numpy(float)
        xcol = formula.split("~")[1].strip()
        X = np.column_stack([np.ones(len(df)), df[xcol].to_numpy(float)])
        g = df[groups].to_numpy()
        for reml in (True, False):
            arrays = median_time(lambda: lmefast.MixedLM(y, X, g, X).fit(reml=reml), reps * 20)
            frame = median_time(lambda: lmefast.mixedlm(formula, df, groups=groups,
                                                        re_formula=re_formula).fit(reml=reml),
                                reps * 20)
            res = lmefast.mixedlm(formula, df, groups=groups, re_formula=re_formula).fit(reml=reml)
            row = {"model": name, "reml": reml, "lmefast_arrays_s": arrays[0],
                   "lmefast_frame_s": frame[0], "lmefast_llf": res.llf,
                   "lmefast_converged": res.converged}
            for peer, fn in (
                ("statsmodels", lambda: peers.time_statsmodels(
                    df, formula, groups, re_formula, reml=reml, reps=reps, timeout=300)),
                ("mixedlm_rs", lambda: peers.time_mixedlm_rs(
                    df, formula, groups, re_formula, reml=reml, reps=reps, timeout=300)),
                ("lme4", lambda: peers.time_lme4(df, lme4_formula, reml=reml, reps=reps,
                                                 factors=[groups])),
            ):
                out = fn()
                row[f"{peer}_s"] = None if out is None else out.get("median_s")
                row[f"{peer}_llf"] = None if out is None else out.get("llf")
                row[f"{peer}_converged"] = None if out is None else out.get("converged")
            peer_times = [row[f"{p}_s"] for p in ("statsmodels", "mixedlm_rs", "lme4")
                          if row[f"{p}_s"] is not None]
            fastest = min(peer_times) if peer_times else None
            row["fastest_peer_s"] = fastest
            row["frame_over_fastest_peer"] = None if fastest is None else frame[0] / fastest
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--huge", action="store_true")
    ap.add_argument("--lme4-big", action="store_true")
    ap.add_argument("--sm-big", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "out" / "core.json"))
    args = ap.parse_args()
    if not (args.small or args.big or args.huge):
        args.small = args.big = True
    out = run_record()
    if args.small:
        out["small"] = run_small(args.reps)
    if args.big:
        df = synthetic(1_000_000, 100_000)
        big = {"lmefast": lmefast_big(df, args.reps)}
        print(json.dumps(big), flush=True)
        big["mixedlm_rs"] = peers.time_mixedlm_rs(df, "y ~ x1 + x2", "g", "~x1", reps=3,
                                                  timeout=600)
        if args.lme4_big:
            big["lme4"] = peers.time_lme4(df, "y ~ x1 + x2 + (1 + x1 | g)", reps=0,
                                          factors=["g"], timeout=900)
        if args.sm_big:
            big["statsmodels"] = peers.time_statsmodels(df, "y ~ x1 + x2", "g", "~x1", reps=1,
                                                        warmup=False, timeout=900)
        for k in ("mixedlm_rs", "lme4", "statsmodels"):
            if big.get(k) and big[k].get("median_s"):
                big[f"lmefast_over_{k}"] = big["lmefast"]["median_s"] / big[k]["median_s"]
        out["big"] = big
        print(json.dumps({k: v for k, v in big.items() if k != "lmefast"}, default=str), flush=True)
        del df
    if args.huge:
        df = synthetic(10_000_000, 1_000_000)
        huge = {"lmefast": lmefast_big(df, max(1, args.reps // 2))}
        print(json.dumps(huge), flush=True)
        huge["mixedlm_rs"] = peers.time_mixedlm_rs(df, "y ~ x1 + x2", "g", "~x1", reps=3,
                                                   timeout=1800)
        if huge["mixedlm_rs"] and huge["mixedlm_rs"].get("median_s"):
            huge["lmefast_over_mixedlm_rs"] = (huge["lmefast"]["median_s"]
                                               / huge["mixedlm_rs"]["median_s"])
        out["huge"] = huge
        print(json.dumps({k: v for k, v in huge.items() if k != "lmefast"}, default=str),
              flush=True)
    write_output(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
