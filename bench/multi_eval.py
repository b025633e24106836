"""Per-evaluation cost of the several-factor kernel (lmefast._multi.MultiKernel), one thread.

    OPENBLAS_NUM_THREADS=1 python bench/multi_eval.py [--case expr insteval slopes fitmany]
        [--blocks 7] [--seconds 0.3]

expr      issue 11's design: 600 samples, 100 donors × 6 batches crossed,
          ~ trait + age + (1 | donor) + (1 | batch) (every term scalar)
insteval  lme4's InstEval, y ~ service + (1|s) + (1|d) (scalar terms, a 1,128 × 1,128 trailing
          block)
slopes    a crossed design with a vector-valued first term: 4,000 rows,
          ~ x + (1 + x | g) + (1 | h), 400 levels of g × 20 of h (k1 = 2, the general path)
fitmany   lmefast.fit_many on 1,000 responses of the expr design, Satterthwaite df, n_threads=1

For each kernel case: µs per `evaluate(θ)` without and with the gradient at a fixed θ (the
REML optimum), CPU time (time.process_time) of blocks of calls, the minimum over --blocks
blocks. Prints one JSON line per case. The figures are for comparing two builds run in turn
on the same machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lmefast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from many_bench import expression_design  # noqa: E402


def per_call(f, blocks: int, seconds: float) -> float:
    """Seconds per call of f: CPU time of blocks of calls, the minimum over blocks."""
    f()
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds / 10:
        f()
        n += 1
    n = max(1, 10 * n // blocks)
    best = np.inf
    for _ in range(blocks):
        t0 = time.process_time()
        for _ in range(n):
            f()
        best = min(best, (time.process_time() - t0) / n)
    return best


def kernel_case(name: str, formula: str, data: pd.DataFrame, blocks: int, seconds: float) -> None:
    model = lmefast.lmer_model(formula, data)
    theta = np.asarray(model.fit().theta, dtype=float)
    kernel = model.engine.objective(True, 1).kernel
    # two θ in turn, so that the gradient is not served from the last factorisation alone
    thetas = [theta, theta * 1.01]
    state = [0]

    def ev(grad: bool) -> None:
        state[0] ^= 1
        kernel.evaluate(thetas[state[0]], grad)

    out = {"case": name, "type": type(kernel).__name__,
           "eval_us": 1e6 * per_call(lambda: ev(False), blocks, seconds),
           "eval_grad_us": 1e6 * per_call(lambda: ev(True), blocks, seconds)}
    print(json.dumps(out), flush=True)


def slopes_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 400, 4000)
    h = rng.integers(0, 20, 4000)
    x = rng.standard_normal(4000)
    b = rng.standard_normal((400, 2)) * [1.0, 0.5]
    y = 1 + 0.5 * x + b[g, 0] + b[g, 1] * x + 0.7 * rng.standard_normal(20)[h] \
        + rng.standard_normal(4000)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "h": h.astype(str)})


def insteval_frame() -> pd.DataFrame:
    df = pd.read_csv(HERE / "data" / "InstEval.csv.gz")
    for c in ("s", "d", "service"):
        df[c] = df[c].astype(str)
    return df


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs="+", default=["expr", "insteval", "slopes", "fitmany"],
                    choices=["expr", "insteval", "slopes", "fitmany"])
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3)
    args = ap.parse_args()
    data, Y = expression_design(1000)
    if "expr" in args.case:
        d = data.assign(y=Y[:, 0])
        kernel_case("expr", "y ~ trait + age + (1 | donor) + (1 | batch)", d, args.blocks,
                    args.seconds)
    if "insteval" in args.case:
        kernel_case("insteval", "y ~ service + (1|s) + (1|d)", insteval_frame(), args.blocks,
                    10 * args.seconds)
    if "slopes" in args.case:
        kernel_case("slopes", "y ~ x + (1 + x | g) + (1 | h)", slopes_frame(), args.blocks,
                    args.seconds)
    if "fitmany" in args.case:
        rhs = "~ trait + age + (1 | donor) + (1 | batch)"
        lmefast.fit_many(rhs, data, Y[:, :20], n_threads=1)
        times = []
        for _ in range(3):
            t0 = time.process_time()
            lmefast.fit_many(rhs, data, Y, n_threads=1)
            times.append(time.process_time() - t0)
        print(json.dumps({"case": "fitmany_1000", "cpu_s_min": min(times),
                          "cpu_s": [round(t, 4) for t in times]}), flush=True)


if __name__ == "__main__":
    main()
