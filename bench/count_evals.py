"""Objective evaluations per fit (OptSummary.n_evals: deterministic, unlike times) for the
reference models of tests/data/cases.json (REML and ML, the lme4 spelling and, where there is
one, the statsmodels spelling) and the benchmark models.

    OPENBLAS_NUM_THREADS=1 python bench/count_evals.py [--big] [--huge] [--insteval]
        [--crossed-big] [--out bench/out/evals.json] [--compare bench/out/evals_before.json]

Each row: model, evaluations, iterations, objective, converged, θ. With --compare, a second
file's rows are set beside (evaluations before → after, and the change of the objective).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pandas as pd  # noqa: E402

import lmefast  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data"
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))


def row_of(name: str, res) -> dict:
    opt = res.optsummary
    return {"model": name, "n_evals": opt.n_evals, "n_iter": opt.n_iter,
            "objective": opt.objective_final, "converged": opt.converged,
            "return_code": opt.return_code, "theta": [float(t) for t in opt.theta_final]}


def reference_rows() -> list[dict]:
    rows = []
    for case in json.loads((DATA / "cases.json").read_text()):
        df = pd.read_csv(DATA / f"{case['data']}.csv")
        for reml in (True, False):
            tag = "reml" if reml else "ml"
            rows.append(row_of(f"{case['id']}/lme4/{tag}", lmefast.lmer(case["lme4"], df, reml=reml)))
            sm = case.get("sm")
            if sm and sm.get("groups"):
                model = lmefast.mixedlm(sm["formula"], df, groups=sm["groups"],
                                        re_formula=sm.get("re_formula"),
                                        vc_formula=sm.get("vc_formula"))
                rows.append(row_of(f"{case['id']}/sm/{tag}", model.fit(reml=reml)))
    return rows


def random_slopes_row(n_rows: int, n_groups: int) -> dict:
    from compare_core import synthetic

    df = synthetic(n_rows, n_groups)
    res = lmefast.mixedlm("y ~ x1 + x2", df, groups="g", re_formula="~x1").fit()
    return row_of(f"random_slopes_{n_rows}_{n_groups}", res)


def insteval_row() -> dict:
    df = pd.read_csv(HERE / "data" / "InstEval.csv.gz")
    for c in ("s", "d", "service"):
        df[c] = df[c].astype(str)
    return row_of("insteval", lmefast.lmer("y ~ service + (1|s) + (1|d)", df))


def crossed_big_row() -> dict:
    from compare_crossed import synthetic

    df = synthetic(1_000_000, 50_000, 2_000)
    return row_of("crossed_1000000_50000x2000", lmefast.lmer("y ~ x + (1|a) + (1|b)", df))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--huge", action="store_true")
    ap.add_argument("--insteval", action="store_true")
    ap.add_argument("--crossed-big", action="store_true")
    ap.add_argument("--out", default=str(HERE / "out" / "evals.json"))
    ap.add_argument("--compare", default=None)
    args = ap.parse_args()
    rows = reference_rows()
    if args.big:
        rows.append(random_slopes_row(1_000_000, 100_000))
    if args.huge:
        rows.append(random_slopes_row(10_000_000, 1_000_000))
    if args.insteval:
        rows.append(insteval_row())
    if args.crossed_big:
        rows.append(crossed_big_row())
    before = {}
    if args.compare:
        before = {r["model"]: r for r in json.loads(Path(args.compare).read_text())["rows"]}
    total_b = total_a = 0
    for r in rows:
        b = before.get(r["model"])
        line = f"{r['model']:40s} evals {r['n_evals']:3d}  iter {r['n_iter']:3d}  " \
               f"objective {r['objective']:.10f}  converged {r['converged']}"
        if b is not None:
            total_b += b["n_evals"]
            total_a += r["n_evals"]
            line += f"  | before {b['n_evals']:3d}  Δobjective {r['objective'] - b['objective']:+.2e}"
        print(line, flush=True)
    if before:
        print(f"total evaluations: before {total_b}, after {total_a}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
