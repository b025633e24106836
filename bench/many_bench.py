"""Issue 11 bench: one design, many responses, peers in the same run.

(a) 1,000 responses on sleepstudy's design, Reaction ~ Days + (Days|Subject) (REML), responses
    simulated from the fit: lmefast.fit_many (no df, and with Satterthwaite df) against lme4's
    refit(fit, newresp = y) for each response.
(b) a synthetic gene-expression design: 600 samples = 100 donors × 6 batches (crossed),
    ~ trait + age + (1 | donor) + (1 | batch), m responses (default 20,000) with Satterthwaite
    df: lmefast.fit_many on all of them against lmerTest (lmer + summary per response) and
    against a plain loop of lmefast.lmer + coef_table, both timed on a subset and scaled to m.
(c) the design of (b) with per-response precision weights (voom/dream's case: an n × m matrix
    of weights, each response its own cross-products): fit_many on --m-weighted responses
    against lmerTest with weights=, timed on --subset-r responses and scaled.

The machine is shared: every comparison is run `--pairs` times in turn (lmefast, peer,
lmefast, peer, ...) and medians are reported with their ratio.

    python bench/many_bench.py [--m 20000] [--subset-r 100] [--subset-py 200] [--pairs 3]
                               [--m-weighted 2000]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lmefast
from lmefast.datasets import load_sleepstudy

R_REFIT = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE); d <- read.csv(args[1]); Y <- as.matrix(read.csv(args[2]))
d$Subject <- factor(d$Subject)
m <- lmer(Reaction ~ Days + (Days|Subject), d)
t <- system.time(for (j in seq_len(ncol(Y))) f <- refit(m, newresp = Y[, j]))[["elapsed"]]
cat(sprintf('{"seconds": %.6f, "n": %d}\n', t, ncol(Y)))
"""

R_LMERTEST = r"""
suppressMessages(library(lmerTest))
args <- commandArgs(TRUE); d <- read.csv(args[1]); Y <- as.matrix(read.csv(args[2]))
d$donor <- factor(d$donor); d$batch <- factor(d$batch)
t <- system.time(for (j in seq_len(ncol(Y))) {
  d$y <- Y[, j]
  s <- summary(lmer(y ~ trait + age + (1 | donor) + (1 | batch), d))$coefficients
})[["elapsed"]]
cat(sprintf('{"seconds": %.6f, "n": %d}\n', t, ncol(Y)))
"""


R_LMERTEST_W = r"""
suppressMessages(library(lmerTest))
args <- commandArgs(TRUE); d <- read.csv(args[1]); Y <- as.matrix(read.csv(args[2]))
W <- as.matrix(read.csv(args[3]))
d$donor <- factor(d$donor); d$batch <- factor(d$batch)
t <- system.time(for (j in seq_len(ncol(Y))) {
  d$y <- Y[, j]; d$w <- W[, j]
  s <- summary(lmer(y ~ trait + age + (1 | donor) + (1 | batch), d, weights = w))$coefficients
})[["elapsed"]]
cat(sprintf('{"seconds": %.6f, "n": %d}\n', t, ncol(Y)))
"""


def expression_design(m: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """100 donors × 6 batches; each response has its own donor and batch variances and
    trait effect."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(100), 6)
    batch = np.tile(np.arange(6), 100)
    n = donor.shape[0]
    data = pd.DataFrame({"donor": donor, "batch": batch, "trait": rng.standard_normal(n),
                         "age": rng.uniform(20, 80, 100)[donor]})
    sd_d = rng.uniform(0.1, 1.5, m)
    sd_b = rng.uniform(0.1, 1.0, m)
    effect = rng.normal(0, 0.3, m)
    Y = (effect[None, :] * data.trait.to_numpy()[:, None]
         + (rng.standard_normal((100, m)) * sd_d)[donor]
         + (rng.standard_normal((6, m)) * sd_b)[batch] + rng.standard_normal((n, m)))
    return data, Y


def run_r(script: str, *paths: Path) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(script)
    out = subprocess.run(["Rscript", f.name, *map(str, paths)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=20_000)
    ap.add_argument("--subset-r", type=int, default=100)
    ap.add_argument("--subset-py", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--m-weighted", type=int, default=2000)
    args = ap.parse_args()
    if args.subset_r < 1 or args.subset_py < 1 or args.pairs < 1:
        ap.error("--subset-r, --subset-py and --pairs must be at least 1 (the peers are timed on "
                 "that many responses and scaled to --m)")
    tmp = Path(tempfile.mkdtemp())
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, lmefast {lmefast.__version__}")

    # (a) sleepstudy, 1,000 responses
    ss = load_sleepstudy()
    fit = lmefast.lmer("Reaction ~ Days + (Days | Subject)", ss)
    Ys = fit.simulate(1000, seed=1).T
    ss.to_csv(tmp / "ss.csv", index=False)
    pd.DataFrame(Ys).to_csv(tmp / "ss_y.csv", index=False)
    a_none, a_satt, a_r = [], [], []
    for _ in range(args.pairs):
        a_none.append(timed(lambda: lmefast.fit_many("~ Days + (Days | Subject)", ss, Ys, ddf=None)))
        a_satt.append(timed(lambda: lmefast.fit_many("~ Days + (Days | Subject)", ss, Ys)))
        a_r.append(run_r(R_REFIT, tmp / "ss.csv", tmp / "ss_y.csv"))
    r = np.median(a_r)
    print(f"(a) sleepstudy 1,000 responses: lme4 refit {r:.2f} s; fit_many {np.median(a_none):.3f} s "
          f"({np.median(a_none) / r:.4f}×), with Satterthwaite {np.median(a_satt):.3f} s "
          f"({np.median(a_satt) / r:.4f}×)  [runs: refit {np.round(a_r, 2).tolist()}, "
          f"fit_many {np.round(a_none, 3).tolist()}, +df {np.round(a_satt, 3).tolist()}]")

    # (b) 600 samples × m responses, crossed donors and batches, Satterthwaite df
    data, Y = expression_design(args.m)
    data.to_csv(tmp / "d.csv", index=False)
    pd.DataFrame(Y[:, :args.subset_r]).to_csv(tmp / "y.csv", index=False)
    rhs = "trait + age + (1 | donor) + (1 | batch)"

    def py_loop() -> None:
        d = data.copy()
        for j in range(args.subset_py):
            d["y"] = Y[:, j]
            lmefast.lmer(f"y ~ {rhs}", d).coef_table()

    b_many, b_r, b_py = [], [], []
    for _ in range(args.pairs):
        b_many.append(timed(lambda: lmefast.fit_many(f"~ {rhs}", data, Y)))
        b_r.append(run_r(R_LMERTEST, tmp / "d.csv", tmp / "y.csv") * args.m / args.subset_r)
        b_py.append(timed(py_loop) * args.m / args.subset_py)
    many = np.median(b_many)
    print(f"(b) {args.m:,} responses × 600 samples, Satterthwaite df: fit_many {many:.2f} s; lmerTest loop "
          f"{np.median(b_r):.0f} s (from {args.subset_r} responses; {many / np.median(b_r):.4f}×); "
          f"lmefast.lmer loop {np.median(b_py):.0f} s (from {args.subset_py}; {many / np.median(b_py):.3f}×)  "
          f"[runs: fit_many {np.round(b_many, 2).tolist()}, lmerTest {np.round(b_r, 0).tolist()}, "
          f"lmer loop {np.round(b_py, 0).tolist()}]")
    res = lmefast.fit_many(f"~ {rhs}", data, Y[:, :1000], n_threads=1)
    print(f"    objective evaluations per response (first 1,000, deterministic): "
          f"{res._out.n_evals.mean():.1f} to fit, + 16 solves for Satterthwaite")

    # (c) per-response precision weights
    mw = args.m_weighted
    W = np.random.default_rng(5).uniform(0.2, 3.0, (Y.shape[0], mw))
    pd.DataFrame(W[:, :args.subset_r]).to_csv(tmp / "w.csv", index=False)
    c_many, c_r = [], []
    for _ in range(args.pairs):
        c_many.append(timed(lambda: lmefast.fit_many(f"~ {rhs}", data, Y[:, :mw], weights=W)))
        c_r.append(run_r(R_LMERTEST_W, tmp / "d.csv", tmp / "y.csv", tmp / "w.csv") * mw / args.subset_r)
    print(f"(c) {mw:,} responses with per-response weights, Satterthwaite df: fit_many "
          f"{np.median(c_many):.2f} s; lmerTest loop with weights {np.median(c_r):.0f} s (from "
          f"{args.subset_r}; {np.median(c_many) / np.median(c_r):.4f}×)  [runs: fit_many "
          f"{np.round(c_many, 2).tolist()}, lmerTest {np.round(c_r, 0).tolist()}]")


if __name__ == "__main__":
    main()
