"""Command line: ``lmefast`` (demo fit on the bundled dietox data) and ``lmefast fit``.

    lmefast                       # Weight ~ Time, random intercept and slope by Pig, REML
    lmefast fit DATA.csv "y ~ x" --groups g [--re-formula "~x"] [--vc NAME=FORMULA] [--ml]
    lmefast fit DATA.csv "y ~ x + (1 + x | g) + (1 | h)" [--ml]     # lme4 syntax
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from lmefast.api import lmer, mixedlm
from lmefast.errors import SpecificationError


def _read(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise SpecificationError(f"data file {path!r} does not exist")
    if p.suffix.lower() in (".parquet", ".pq") or p.is_dir():
        return pd.read_parquet(p)
    return pd.read_csv(p)


def _fit_and_print(df: pd.DataFrame, formula: str, groups: str | None, re_formula: str | None,
                   vc: dict[str, str] | None, reml: bool, missing: str) -> None:
    """statsmodels' spelling with --groups; lme4's (random terms in the formula) without."""
    times = []
    for _ in range(2):  # the first fit pays one-time imports; the second is a warm fit
        t0 = time.perf_counter()
        if groups is None:
            res = lmer(formula, df, reml=reml, missing=missing)
        else:
            model = mixedlm(formula, df, groups=groups, re_formula=re_formula, vc_formula=vc,
                            missing=missing)
            res = model.fit(reml=reml)
        times.append(time.perf_counter() - t0)
    print(res.summary())
    print(f"\nfit from the data frame: {times[1] * 1e3:.2f} ms warm ({times[0] * 1e3:.1f} ms "
          f"cold, with imports); {res.optsummary.n_evals} evaluations of the objective; "
          f"theta = {res.theta.round(6).tolist()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmefast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="fit the demo model on the bundled dietox data")
    demo.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit = sub.add_parser("fit", help="fit a model to a CSV or Parquet file")
    fit.add_argument("data", help="CSV or Parquet file (or Parquet directory)")
    fit.add_argument("formula", help='fixed-effects formula, e.g. "y ~ x1 + x2"')
    fit.add_argument("--groups", default=None,
                     help="grouping column (statsmodels' spelling); omit it for an lme4 formula "
                          'with its random terms, e.g. "y ~ x + (1 + x | g)"')
    fit.add_argument("--re-formula", default=None, help='random effects, e.g. "~x1" (default: intercept)')
    fit.add_argument("--vc", action="append", default=[], metavar="NAME=FORMULA",
                     help='variance component nested in groups, e.g. cask="0 + C(cask)"')
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--drop-missing", action="store_true", help="drop rows with missing values")
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "demo"):
            from lmefast.datasets import load_dietox

            print("lmefast demo: dietox, Weight ~ Time, random intercept and slope by Pig\n")
            _fit_and_print(load_dietox(), "Weight ~ Time", "Pig", "~Time", None,
                           not getattr(args, "ml", False), "raise")
        else:
            vc = {}
            for item in args.vc:
                name, sep, form = item.partition("=")
                if not sep:
                    raise SpecificationError(f"--vc expects NAME=FORMULA, got {item!r}")
                vc[name.strip()] = form.strip()
            _fit_and_print(_read(args.data), args.formula, args.groups, args.re_formula,
                           vc or None, not args.ml, "drop" if args.drop_missing else "raise")
    except SpecificationError as exc:
        print(f"lmefast: error: {exc}", file=sys.stderr)
        return 2
    return 0
