"""Several grouping factors (issue: lme4 formulas, crossed and nested effects): lmefast
against lme4 (Rscript) and statsmodels' one-group spelling, same data, one run.

    python bench/compare_crossed.py [--small] [--insteval] [--big] [--lme4-big] [--reps N]

--small     Penicillin (crossed) and Pastes (nested): per fit, from a prepared model
            ("arrays": the cross-products are built, time is the fit) and from a DataFrame
            with the lme4 formula; lme4's lmer; statsmodels' vc_formula spelling.
--insteval  lme4's InstEval, y ~ service + (1|s) + (1|d) (73,421 rows, 2,972 × 1,128 levels;
            bench/data/InstEval.csv.gz, written by bench/data/export_insteval.R).
--big       synthetic y ~ x + (1|a) + (1|b): 1,000,000 rows, 50,000 × 2,000 levels; time and
            peak traced memory (lme4 only with --lme4-big).
BLAS threads are left at the library default (the dense trailing block uses them); the
small models' timings are not affected.
"""
from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from pathlib import Path

import pandas as pd

import lmefast
from lmefast._testing import crossed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import peers  # noqa: E402
from compare_core import median_time, run_record, write_output  # noqa: E402

DATA = HERE.parent / "tests" / "data"


def small(reps: int) -> list[dict]:
    cases = [
        ("penicillin", "Penicillin.csv", "diameter ~ 1 + (1|plate) + (1|sample)",
         {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}, ["plate", "sample"]),
        ("pastes", "Pastes.csv", "strength ~ 1 + (1|batch/cask)", None, ["batch", "cask"]),
    ]
    rows = []
    for name, csv, formula, vcf, factors in cases:
        df = pd.read_csv(DATA / csv)
        df["one"] = 1
        for reml in (True, False):
            model = lmefast.lmer_model(formula, df)
            _ = model.crossprods
            arrays = median_time(lambda: model.fit(reml=reml), reps * 20)
            frame = median_time(lambda: lmefast.lmer(formula, df, reml=reml), reps * 20)
            res = lmefast.lmer(formula, df, reml=reml)
            row = {"model": name, "reml": reml, "lmefast_fit_s": arrays[0],
                   "lmefast_frame_s": frame[0], "lmefast_llf": res.llf,
                   "n_evals": res.optsummary.n_evals}
            out = peers.time_lme4(df, formula, reml=reml, reps=reps, factors=factors)
            row["lme4_s"] = None if out is None else out.get("median_s")
            row["lme4_llf"] = None if out is None else out.get("llf")
            if vcf is not None:
                sm = peers.time_statsmodels(df, formula.split("+")[0].strip(), "one", "0", vcf,
                                            reml=reml, reps=max(1, reps // 2), timeout=600)
                row["statsmodels_s"] = None if sm is None else sm.get("median_s")
                row["statsmodels_llf"] = None if sm is None else sm.get("llf")
                lm_sm = median_time(lambda: lmefast.mixedlm(
                    formula.split("+")[0].strip(), df, groups="one", re_formula="0",
                    vc_formula=vcf).fit(reml=reml), reps * 20)
                row["lmefast_statsmodels_spelling_s"] = lm_sm[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def insteval(reps: int) -> dict:
    df = pd.read_csv(HERE / "data" / "InstEval.csv.gz")
    for c in ("s", "d", "service"):
        df[c] = df[c].astype(str)
    formula = "y ~ service + (1|s) + (1|d)"
    res = lmefast.lmer(formula, df)
    med, n = median_time(lambda: lmefast.lmer(formula, df), reps)
    out = {"lmefast_s": med, "n_reps": n, "lmefast_llf": res.llf,
           "n_evals": res.optsummary.n_evals, "theta": res.theta.tolist()}
    lme4 = peers.time_lme4(df, formula, reps=1, factors=["s", "d", "service"], timeout=900)
    if lme4 is not None:
        out.update(lme4_s=lme4.get("median_s"), lme4_llf=lme4.get("llf"),
                   lme4_theta=lme4.get("theta"), lme4_error=lme4.get("error"))
        if lme4.get("median_s"):
            out["ratio"] = med / lme4["median_s"]
    print(json.dumps(out), flush=True)
    return out


def synthetic(n: int, ma: int, mb: int, seed: int = 3) -> pd.DataFrame:
    """y ~ x + (1|a) + (1|b) data (lmefast._testing.crossed, shared with the tests)."""
    return crossed(n, ma, mb, seed)


def big(reps: int, with_lme4: bool) -> dict:
    df = synthetic(1_000_000, 50_000, 2_000)
    formula = "y ~ x + (1|a) + (1|b)"
    res = lmefast.lmer(formula, df)
    med, n = median_time(lambda: lmefast.lmer(formula, df), reps, budget_s=60)
    tracemalloc.start()
    lmefast.lmer(formula, df)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data = int(df.memory_usage(deep=True).sum())
    out = {"lmefast_s": med, "n_reps": n, "llf": res.llf, "n_evals": res.optsummary.n_evals,
           "converged": res.converged, "peak_traced_bytes": peak, "data_bytes": data,
           "peak_over_data": peak / data}
    if with_lme4:
        lme4 = peers.time_lme4(df, formula, reps=0, factors=["a", "b"], timeout=3600)
        if lme4 is not None:
            out.update(lme4_s=lme4.get("median_s"), lme4_llf=lme4.get("llf"))
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--insteval", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--lme4-big", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "out" / "crossed.json"))
    args = ap.parse_args()
    if not (args.small or args.insteval or args.big):
        args.small = args.insteval = True
    out = run_record()
    if args.small:
        out["small"] = small(args.reps)
    if args.insteval:
        out["insteval"] = insteval(args.reps)
    if args.big:
        out["big"] = big(max(1, args.reps // 2), args.lme4_big)
    write_output(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
