"""Issue 4 bench: parametric bootstrap of sleepstudy Reaction ~ Days + (Days|Subject) (REML),
1,000 replicates, lmefast (cross-product draws, no pass over the rows) against lme4's bootMer
(FUN = fixef + θ + σ) in the same run; also the cost of profile intervals and of the
Satterthwaite / Kenward-Roger tables, and Kenward-Roger on 100,000 rows / 10,000 groups.

    python bench/bootstrap_bench.py [--reps 1000] [--no-r]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lmefast

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data" / "sleepstudy.csv"

R_SCRIPT = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE); nrep <- as.integer(args[1]); csv <- args[2]
d <- read.csv(csv); d$Subject <- factor(d$Subject)
m <- lmer(Reaction ~ Days + (Days|Subject), d)
f <- function(x) c(fixef(x), getME(x, "theta"), sigma(x))
t <- system.time(b <- bootMer(m, f, nsim = nrep, seed = 1))[["elapsed"]]
cat(sprintf('{"seconds": %.6f, "nrep": %d, "lme4": "%s"}\n', t, nrep, packageVersion("lme4")))
"""


def best_of(f, k=5):
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts)), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--no-r", action="store_true")
    a = ap.parse_args()
    df = pd.read_csv(DATA)
    res = lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days").fit()
    out: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                 "cores": __import__("os").cpu_count(), "date": time.strftime("%Y-%m-%d")}
    res.bootstrap(10, seed=0)  # warm (per-fit factors are cached)
    for jobs in (1, 2):
        best, med, boot = best_of(lambda j=jobs: res.bootstrap(a.reps, seed=1, n_jobs=j))
        out[f"lmefast_bootstrap_{a.reps}_jobs{jobs}_s"] = {"best": best, "median": med,
                                                           "converged": float(boot.converged.mean())}
    res2 = lmefast.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days").fit()
    t = time.perf_counter()
    res2.conf_int(method="profile")
    out["lmefast_profile_confint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res2.coef_table("satterthwaite")
    out["lmefast_satterthwaite_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res2.coef_table("kenward-roger")
    out["lmefast_kenward_roger_s"] = time.perf_counter() - t
    # Kenward-Roger at scale: 100,000 rows, 10,000 groups, random slope
    rng = np.random.default_rng(0)
    m, ni = 10_000, 10
    g = np.repeat(np.arange(m), ni)
    x = rng.standard_normal(m * ni)
    b0, b1 = rng.standard_normal(m), 0.5 * rng.standard_normal(m)
    y = 1 + 2 * x + b0[g] + b1[g] * x + rng.standard_normal(m * ni)
    big = lmefast.mixedlm("y ~ x", pd.DataFrame({"y": y, "x": x, "g": g}), groups="g", re_formula="~x").fit()
    t = time.perf_counter()
    kr = big.coef_table("kenward-roger")
    out["kenward_roger_100k_rows_10k_groups_s"] = time.perf_counter() - t
    out["kenward_roger_100k_df"] = kr["df"].tolist()
    t = time.perf_counter()
    big.coef_table("satterthwaite")
    out["satterthwaite_100k_rows_10k_groups_s"] = time.perf_counter() - t
    if not a.no_r and shutil.which("Rscript"):
        with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
            fh.write(R_SCRIPT)
        r = subprocess.run(["Rscript", fh.name, str(a.reps), str(DATA)], capture_output=True, text=True,
                           check=True)
        out["lme4_bootMer"] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "bootstrap.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
