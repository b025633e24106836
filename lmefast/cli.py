"""The command line: ``lmefast`` (a demo fit) and ``lmefast fit`` (one model on a data file).

Every run fits once and prints the summary; ``--output`` writes the results to a file. Errors
are one line on stderr (with a hint where one helps) and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Linear mixed-effects models: statsmodels' MixedLM spelling or lme4's formulas, REML or ML.

  lmefast                          demo: dietox, Weight ~ Time, random intercept and slope by Pig
  lmefast fit DATA "y ~ x" --groups g [--re-formula "~x"] [--vc NAME=FORMULA]   statsmodels' spelling
  lmefast fit DATA "y ~ x + (1 + x | g) + (1 | h)"                               lme4's spelling

DATA is a CSV file (read into memory) or a Parquet file or directory of Parquet files (fitted
out of core: read chunk by chunk, never all at once; needs pyarrow). Options of 'fit':
--reml/--ml, --ddf, --threads, --output results.json or results.csv, --timing.
Run 'lmefast fit --help' for all of them.
"""

FIT_EPILOG = """\
examples:
  lmefast fit sleep.csv "Reaction ~ Days" --groups Subject --re-formula "~Days"
  lmefast fit pastes.csv "strength ~ 1" --groups batch --re-formula 1 --vc "cask=0 + C(cask)" --ml
  lmefast fit penicillin.csv "diameter ~ 1 + (1 | plate) + (1 | sample)" --output fit.json
  lmefast fit data/ "y ~ x + (1 + x | g)" --threads 2 --ddf satterthwaite --timing

--output writes the coefficients (estimate, standard error, df, test statistic, p-value,
confidence interval), the variance components (lme4's VarCorr: variances, covariances,
standard deviations, correlations), fit statistics (log-likelihood, AIC, BIC, number of
observations) and the optimiser's record (convergence, boundary fit, evaluations). A .json
file holds one object with those four parts; a .csv file is one long table with columns
section, group, term, term2, statistic, value.
"""

DDF_CHOICES = ("satterthwaite", "kenward-roger", "residual")
OUTPUT_SUFFIXES = (".json", ".csv")
PARQUET_SUFFIXES = (".parquet", ".pq")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UsageError(Exception):
    """A problem to report in one line, with an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# -- reading the data ---------------------------------------------------------------------------
def _is_parquet(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in PARQUET_SUFFIXES


def load_data(path_text: str) -> Any:
    """A CSV file as a DataFrame; a Parquet file or directory as its path (fitted out of core)."""
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"data file '{path_text}' does not exist")
    if _is_parquet(path):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("reading Parquet needs pyarrow",
                             hint='pip install "lmefast[bigdata]" (or pip install pyarrow)') from None
        return str(path)
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise UsageError(f"data file '{path_text}' is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UsageError(f"data file '{path_text}' is not a readable CSV file: {_first_line(exc)}",
                         hint="Parquet files need the suffix .parquet or .pq") from None
    if len(df) == 0:
        raise UsageError(f"data file '{path_text}' has a header but no rows")
    return df


# -- checking the spelling before any work -------------------------------------------------------
def parse_vc(items: list[str]) -> dict[str, str] | None:
    vc = {}
    for item in items:
        name, sep, form = item.partition("=")
        if not sep or not name.strip() or not form.strip():
            raise UsageError(f"--vc expects NAME=FORMULA, got '{item}'", hint='e.g. --vc "cask=0 + C(cask)"')
        vc[name.strip()] = form.strip()
    return vc or None


def check_spelling(args: argparse.Namespace) -> None:
    """statsmodels' spelling (--groups) and lme4's (random terms in the formula) do not mix."""
    lme4_terms = "|" in args.formula
    if args.groups is not None and any("|" in f for f in [args.formula, args.re_formula or "", *args.vc]):
        raise UsageError("lme4 random-effects terms '( ... | g)' and --groups are given together",
                         hint="drop --groups (and --re-formula, --vc) to fit the lme4 formula, or "
                              "remove the random terms from the formula to use --groups")
    if args.groups is None and (args.re_formula is not None or args.vc):
        raise UsageError("--re-formula and --vc need --groups (statsmodels' spelling)",
                         hint="with lme4's spelling put the random terms in the formula, "
                              'e.g. "y ~ x + (1 + x | g)"')
    if args.groups is None and not lme4_terms:
        raise UsageError("the model has no random effects",
                         hint='give --groups COLUMN, or add a random-effects term such as "(1 | g)" '
                              "to the formula")
    if "~" not in args.formula:
        raise UsageError(f"the formula '{args.formula}' has no '~'", hint='e.g. "y ~ x"')
    if args.output is not None and Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output '{args.output}': the file name must end in .json or .csv")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.ddf == "kenward-roger" and _is_parquet(Path(args.data)):
        raise UsageError("Kenward-Roger needs the rows in memory, and Parquet data are fitted out of core",
                         hint="--ddf satterthwaite")


# -- fitting -------------------------------------------------------------------------------------
def fit_model(args: argparse.Namespace, data: Any):
    """One fit through the public API (lmefast.lmer or lmefast.mixedlm)."""
    import lmefast

    missing = "drop" if args.drop_missing else "raise"
    options: dict[str, Any] = {}
    if args.threads is not None:
        options["n_threads"] = args.threads
    if args.groups is None:
        return lmefast.lmer(args.formula, data, reml=args.reml, missing=missing, **options)
    model = lmefast.mixedlm(args.formula, data, groups=args.groups, re_formula=args.re_formula,
                            vc_formula=parse_vc(args.vc), missing=missing)
    return model.fit(reml=args.reml, **options)


# -- results as a record -------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-friendly scalars: numpy types to Python, NaN and infinities to None."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_record(res: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Coefficients, variance components, fit statistics and convergence of one fit."""
    table = res.coef_table(ddf=args.ddf)
    coefficients = [{"term": str(term), **{str(k): _plain(v) for k, v in row.items()}}
                    for term, row in table.iterrows()]
    variance = []
    for row in res.varcorr().itertuples(index=False):
        var1, var2 = (None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                      for v in (row.var1, row.var2))
        variance.append({"group": str(row.grp), "term": var1, "term2": var2,
                         "vcov": _plain(row.vcov), "sdcor": _plain(row.sdcor)})
    opt = res.optsummary
    return {
        "model": {"data": args.data, "formula": args.formula, "groups": args.groups,
                  "re_formula": args.re_formula, "vc_formula": parse_vc(args.vc),
                  "method": "REML" if args.reml else "ML", "ddf": args.ddf},
        "coefficients": coefficients,
        "variance_components": variance,
        "fit": {"nobs": _plain(res.nobs), "llf": _plain(res.llf), "aic": _plain(res.aic),
                "bic": _plain(res.bic)},
        "convergence": {"converged": bool(res.converged), "singular": bool(res.singular),
                        "return_code": opt.return_code, "n_evals": _plain(opt.n_evals),
                        "n_iter": _plain(opt.n_iter), "optimizer": opt.optimizer,
                        "theta": [_plain(t) for t in opt.theta_final]},
    }


def record_rows(record: dict[str, Any]) -> list[tuple[str, str, str, str, str, Any]]:
    """The record as one long table: (section, group, term, term2, statistic, value)."""
    rows: list[tuple[str, str, str, str, str, Any]] = []
    for coef in record["coefficients"]:
        rows += [("coefficient", "", coef["term"], "", k, v) for k, v in coef.items() if k != "term"]
    for vc in record["variance_components"]:
        rows += [("variance", vc["group"], vc["term"] or "", vc["term2"] or "", k, vc[k])
                 for k in ("vcov", "sdcor")]
    rows += [("fit", "", "", "", k, v) for k, v in record["fit"].items()]
    for k, v in record["convergence"].items():
        if k == "theta":
            rows += [("convergence", "", "", "", f"theta[{i}]", t) for i, t in enumerate(v)]
        else:
            rows.append(("convergence", "", "", "", k, v))
    return rows


def write_output(path_text: str, record: dict[str, Any]) -> None:
    path = Path(path_text)
    try:
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(record, indent=2) + "\n")
            return
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["section", "group", "term", "term2", "statistic", "value"])
            writer.writerows(("" if v is None else v for v in row) for row in record_rows(record))
    except OSError as exc:
        raise UsageError(f"cannot write --output '{path_text}': {exc.strerror or exc}") from None


# -- errors as one line --------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    """The exception's message without colour codes, on one line."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """(message, hint) for any error raised while reading or fitting."""
    if isinstance(exc, UsageError):
        return str(exc), exc.hint
    message = _first_line(exc)
    if "Operator `|`" in message:
        return message, ("lme4 random-effects terms '( ... | g)' are fitted by lmefast.lmer: "
                         "on the command line, drop --groups")
    module = type(exc).__module__
    if module.startswith("pyarrow"):
        return f"cannot read the Parquet data: {message}", "is the file a complete Parquet file?"
    if isinstance(exc, KeyError):
        return f"not found: {message}", None
    return message, None


def _warn_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    text = " ".join(_ANSI.sub("", str(message)).split())
    print(f"lmefast: warning: {text}", file=sys.stderr)


# -- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmefast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{demo,fit}")
    demo = sub.add_parser("demo", help="fit the demo model on the bundled dietox data (the default)",
                          description="Weight ~ Time with a random intercept and slope by Pig, on the "
                                      "dietox data shipped with lmefast.")
    fit = sub.add_parser("fit", help="fit a model to a CSV or Parquet file",
                         description="Fit one linear mixed-effects model and print its summary.",
                         epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("data", help="CSV file, Parquet file (.parquet, .pq) or directory of Parquet files")
    fit.add_argument("formula", help='model formula: "y ~ x1 + x2" with --groups, or an lme4 formula '
                                     'with random terms, "y ~ x + (1 + x | g)"')
    fit.add_argument("--groups", metavar="COLUMN", default=None,
                     help="grouping column (statsmodels' spelling); omit it for an lme4 formula")
    fit.add_argument("--re-formula", metavar="FORMULA", default=None,
                     help='random coefficients per group, e.g. "~x1" (default: an intercept; "0": none)')
    fit.add_argument("--vc", action="append", default=[], metavar="NAME=FORMULA",
                     help='a variance component nested in the groups, e.g. "cask=0 + C(cask)"; repeatable')
    fit.add_argument("--drop-missing", action="store_true",
                     help="drop rows with missing values (default: stop with an error naming the column)")
    fit.add_argument("--ddf", choices=DDF_CHOICES, default=None,
                     help="t-tests of the fixed effects with these denominator degrees of freedom "
                          "(default: z-tests, as statsmodels)")
    fit.add_argument("--output", metavar="FILE", default=None,
                     help="also write the results to FILE (.json or .csv)")
    for p in (demo, fit):
        method = p.add_mutually_exclusive_group()
        method.add_argument("--reml", dest="reml", action="store_true", default=True,
                            help="restricted maximum likelihood (the default)")
        method.add_argument("--ml", dest="reml", action="store_false", help="maximum likelihood")
        p.add_argument("--threads", type=int, metavar="N", default=None,
                       help="threads for the loops over groups (default: all cores for many groups)")
        p.add_argument("--timing", action="store_true",
                       help="print the time spent reading the data and fitting")
        p.add_argument("--plot", metavar="FILE.png", default=None,
                       help="also draw the conditional modes with their intervals (a caterpillar "
                            "plot; needs matplotlib) into FILE.png")
        p.add_argument("--traceback", action="store_true", help="on an error, show Python's traceback")
    return parser


def _demo_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        command="demo", data="dietox (lmefast.datasets)", formula="Weight ~ Time", groups="Pig",
        re_formula="~Time", vc=[], drop_missing=False, ddf=None, output=None,
        reml=getattr(args, "reml", True), threads=getattr(args, "threads", None),
        timing=getattr(args, "timing", False), traceback=getattr(args, "traceback", False),
        plot=getattr(args, "plot", None))


def write_plot(path_text: str, res: Any) -> None:
    """The caterpillar plot of the fit, as PNG (matplotlib's Agg backend: no screen needed)."""
    if Path(path_text).suffix.lower() != ".png":
        raise UsageError(f"--plot '{path_text}': the file name must end in .png")
    try:
        import matplotlib
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "lmefast[plot]"') from None
    matplotlib.use("Agg")
    fig = res.plot("caterpillar")
    try:
        fig.savefig(path_text, dpi=110)
    except OSError as exc:
        raise UsageError(f"cannot write --plot '{path_text}': {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.command == "demo":
        from lmefast.datasets import load_dietox

        print("lmefast demo: dietox, Weight ~ Time, random intercept and slope by Pig\n")
        data = load_dietox()
    else:
        check_spelling(args)
        data = load_data(args.data)
    t1 = time.perf_counter()
    res = fit_model(args, data)
    t2 = time.perf_counter()
    print(res.summary(ddf=args.ddf))
    if args.output is not None:
        write_output(args.output, results_record(res, args))
    if args.plot is not None:
        write_plot(args.plot, res)
    if args.timing:
        read = "" if isinstance(data, str) else f"read {1e3 * (t1 - t0):.1f} ms, "
        where = "out of core, " if isinstance(data, str) else ""
        print(f"\ntiming: {read}fit {1e3 * (t2 - t1):.1f} ms ({where}one fit, first in this process); "
              f"{res.optsummary.n_evals} evaluations of the objective")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]  # the demo's options without its name: lmefast --ml --timing
    args = parser.parse_args(argv)
    if args.command == "demo":
        args = _demo_args(args)
    with warnings.catch_warnings():
        warnings.showwarning = _warn_one_line
        try:
            run(args)
        except Exception as exc:
            if args.traceback:
                raise
            message, hint = describe_error(exc)
            print(f"lmefast: error: {message}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
            return 2
    return 0
