"""The one-factor kernel's small-block path against its general loops, and whole fits.

    OPENBLAS_NUM_THREADS=1 python bench/kernel_small.py eval [--threads 1 2] [--blocks 7]
        [--per-block 10]
    OPENBLAS_NUM_THREADS=1 python bench/kernel_small.py fit [--case big|sleepstudy] [--reps N]
        [--general]

eval  y ~ x1 + x2 + (1 + x1 | g), 1,000,000 rows, 100,000 groups (q = k = 2, p = 3): CPU
      time (time.process_time) of one ``kernel.evaluate(θ, want_grad)`` at θ near the REML
      optimum, with and without the gradient, on the small-block path and on the general
      loops (the same build: lmefast._kernels.SMALL_BLOCK_PATH), blocks of evaluations
      alternating between the two kernels; each figure is the minimum over blocks of a
      block's mean. With more than one thread CPU time sums the threads: wall time
      (time.perf_counter) is printed beside it. Prints one JSON line per thread count.
fit   median wall and CPU seconds of N whole fits (``mixedlm(...).fit()``: the model, its
      cross-products and the fit, at the default threads) of the big design
      or of sleepstudy's Reaction ~ Days + (Days | Subject), after one fit not timed; one JSON
      line. --general: on the general loops (SMALL_BLOCK_PATH off). Run it under two builds,
      or with and without --general, in turn to compare them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import lmefast
from lmefast import _kernels

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from peers import synthetic_random_slopes  # noqa: E402

THETA_BIG = np.array([0.9993, -0.000418, 0.4986])


def big_data():
    return synthetic_random_slopes(1_000_000, 100_000, 1, string_keys=False)


def big_model(df=None):
    df = big_data() if df is None else df
    return lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1")


def sleepstudy_data():
    from lmefast.datasets import load_sleepstudy

    return load_sleepstudy()


def sleepstudy_model(df=None):
    df = sleepstudy_data() if df is None else df
    return lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days")


def block_time(kernel, want_grad: bool, n: int) -> tuple[float, float]:
    """Mean CPU and wall seconds of one evaluation over a block of n."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        kernel.evaluate(THETA_BIG, want_grad)
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def case_eval(threads: list[int], blocks: int, per_block: int) -> None:
    model = big_model()
    for nth in threads:
        obj = model.engine.objective(True, nth)
        _kernels.SMALL_BLOCK_PATH = False
        general = model.engine.objective(True, nth).kernel
        _kernels.SMALL_BLOCK_PATH = True
        small = obj.kernel
        assert small.small_block_path and not general.small_block_path
        f1, f2 = small.evaluate(THETA_BIG, True), general.evaluate(THETA_BIG, True)
        assert abs(f1[0] - f2[0]) <= 1e-10 * abs(f2[0])
        row: dict[str, object] = {"case": "big_1e6_rows_1e5_groups_q2", "n_threads": nth,
                                  "blocks": blocks, "per_block": per_block}
        for want_grad in (False, True):
            times: dict[str, list[tuple[float, float]]] = {"small": [], "general": []}
            for _ in range(blocks):
                for name, kernel in (("small", small), ("general", general)):
                    times[name].append(block_time(kernel, want_grad, per_block))
            tag = "grad" if want_grad else "value"
            for name in ("small", "general"):
                row[f"{tag}_{name}_cpu_ms"] = round(1e3 * min(t[0] for t in times[name]), 3)
                row[f"{tag}_{name}_wall_ms"] = round(1e3 * min(t[1] for t in times[name]), 3)
            row[f"{tag}_cpu_ratio"] = round(row[f"{tag}_general_cpu_ms"]
                                            / row[f"{tag}_small_cpu_ms"], 2)
        print(json.dumps(row), flush=True)


def case_fit(case: str, reps: int, general: bool) -> None:
    if general:
        _kernels.SMALL_BLOCK_PATH = False
    df, make = (big_data(), big_model) if case == "big" else (sleepstudy_data(), sleepstudy_model)
    make(df).fit()
    wall, cpu = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        res = make(df).fit()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    print(json.dumps({"case": f"fit_{case}", "reps": reps, "llf": res.llf,
                      "small_block_path": _kernels.SMALL_BLOCK_PATH
                      if hasattr(_kernels, "SMALL_BLOCK_PATH") else None,
                      "median_wall_s": statistics.median(wall),
                      "median_cpu_s": statistics.median(cpu)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["eval", "fit"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--per-block", type=int, default=10)
    ap.add_argument("--case", default="big", choices=["big", "sleepstudy"])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--general", action="store_true")
    args = ap.parse_args()
    if args.what == "eval":
        case_eval(args.threads, args.blocks, args.per_block)
    else:
        case_fit(args.case, args.reps, args.general)


if __name__ == "__main__":
    main()
