"""The summary table, in statsmodels' layout: ``tables`` (DataFrames: the model facts, the
parameters), ``as_text()``, ``as_html()``, ``as_latex()``."""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


def _names(given: list[str] | None, default: list[str], what: str) -> list[str]:
    if given is None:
        return default
    given = [str(x) for x in given]
    if len(given) != len(default):
        raise ValueError(f"{what} must have {len(default)} names, got {len(given)}")
    return given


def _fmt(x: float, nd: int = 3) -> str:
    return "" if not np.isfinite(x) else f"{x:.{nd}f}"


class Summary:
    """Header of model facts, then one row per parameter: Coef., Std.Err., z, P>|z|, CI."""

    def __init__(self, res: MixedLMResults, alpha: float = 0.05, ddf: str | None = None, *,
                 yname: str | None = None, xname_fe: list[str] | None = None,
                 xname_re: list[str] | None = None, title: str | None = None) -> None:
        self.res = res
        self.alpha = alpha
        self.ddf = ddf
        self.title = "Mixed Linear Model Regression Results" if title is None else title
        self.yname = res.model.endog_names if yname is None else yname
        self.xname_fe = _names(xname_fe, list(res.model.exog_names), "xname_fe")
        self.xname_re = _names(xname_re, [r[0] for r in res._variance_rows()], "xname_re")

    def header(self) -> list[tuple[str, str, str, str]]:
        r = self.res
        all_sizes = r._group_sizes()
        sizes = next(iter(all_sizes.values()))
        groups = (str(len(sizes)) if len(all_sizes) == 1 else
                  ", ".join(f"{name} {len(v)}" for name, v in all_sizes.items()))
        return [
            ("Model:", "MixedLM", "Dependent Variable:", self.yname),
            ("No. Observations:", str(r.nobs), "Method:", r.method),
            ("No. Groups:", groups, "Scale:", f"{r.scale:.4f}"),
            ("Min. group size:", str(sizes.min()), "Log-Likelihood:", f"{r.llf:.4f}"),
            ("Max. group size:", str(sizes.max()), "Converged:", "Yes" if r.converged else "No"),
            ("Mean group size:", f"{sizes.mean():.1f}", "Singular:", "Yes" if r.singular else "No"),
        ]

    def rows(self) -> list[list[str]]:
        r = self.res
        q = stats.norm.ppf(1 - self.alpha / 2)
        out = []
        if self.ddf is not None:  # t-tests with small-sample df (lmefast.inference)
            ct = r.coef_table(self.ddf, self.alpha)
            for name, (_, row) in zip(self.xname_fe, ct.iterrows(), strict=True):
                out.append([name, _fmt(row["estimate"]), _fmt(row["std_err"]), _fmt(row["df"], 2),
                            _fmt(row["t"]), _fmt(row["p"]), _fmt(row["ci_lower"]), _fmt(row["ci_upper"])])
            for name, (_, val, se) in zip(self.xname_re, r._variance_rows(), strict=True):
                out.append([name, _fmt(val), _fmt(se), "", "", "", "", ""])
            return out
        for name, col in zip(self.xname_fe, r.model.exog_names, strict=True):
            est, se = r._fe_params_pd[col], r._bse_fe_pd[col]
            z = est / se
            p = 2 * stats.norm.sf(abs(z))
            out.append([name, _fmt(est), _fmt(se), _fmt(z, 3), _fmt(p), _fmt(est - q * se),
                        _fmt(est + q * se)])
        for name, (_, val, se) in zip(self.xname_re, r._variance_rows(), strict=True):
            out.append([name, _fmt(val), _fmt(se), "", "", "", ""])
        return out

    def _columns(self) -> list[str]:
        lo, hi = f"[{self.alpha / 2:.3f}", f"{1 - self.alpha / 2:.3f}]"
        return (["", "Coef.", "Std.Err.", "z", "P>|z|", lo, hi] if self.ddf is None else
                ["", "Coef.", "Std.Err.", "df", "t", "P>|t|", lo, hi])

    @cached_property
    def tables(self) -> list[pd.DataFrame]:
        """[the model facts (4 columns, as printed), the parameters (one row per fixed effect
        and variance parameter, the printed columns)]."""
        head = pd.DataFrame(self.header())
        cols = self._columns()
        rows = self.rows()
        params = pd.DataFrame([r[1:] for r in rows], index=[r[0] for r in rows], columns=cols[1:])
        return [head, params]

    def as_html(self) -> str:
        head, params = self.tables
        return (f"<h3>{self.title}</h3>" + head.to_html(header=False, index=False)
                + params.to_html())

    def as_latex(self) -> str:
        head, params = self.tables
        return (f"\\begin{{center}}{self.title}\\end{{center}}\n"
                + head.to_latex(header=False, index=False) + params.to_latex())

    def lme4_text(self) -> str:
        """lme4's layout (summary of an lmer fit): the criterion, a VarCorr block (Groups, Name,
        Variance, Std.Dev., Corr), the numbers of observations and levels, then the fixed
        effects (with lmerTest's df and p-values when ``ddf`` is given)."""
        r = self.res
        crit = ("REML criterion at convergence" if r.reml else "deviance")
        lines = [f"Linear mixed model fit by {'REML' if r.reml else 'maximum likelihood'}",
                 f"{crit}: {r.objective:.4f}    logLik: {r.llf:.4f}", "", "Random effects:"]
        vc = r.varcorr()
        rows = [["Groups", "Name", "Variance", "Std.Dev.", "Corr"]]
        corr: dict[tuple[str, str], list[str]] = {}
        for row in vc.itertuples():
            if isinstance(row.var2, str):
                corr.setdefault((row.grp, row.var2), []).append(f"{row.sdcor:.2f}")
        shown: set[str] = set()
        for row in vc.itertuples():
            if isinstance(row.var2, str):
                continue
            group = "" if row.grp in shown else str(row.grp)
            shown.add(row.grp)
            name = "" if row.grp == "Residual" else str(row.var1)
            rows.append([group, name, f"{row.vcov:.4g}", f"{row.sdcor:.4g}",
                         " ".join(corr.get((row.grp, name), []))])
        widths = [max(len(x[i]) for x in rows) for i in range(5)]
        for x in rows:
            lines.append(" " + " ".join(x[i].ljust(widths[i]) if i < 2 else x[i].rjust(widths[i])
                                        for i in range(5)).rstrip())
        groups = ", ".join(f"{name}, {len(v)}" for name, v in r._group_sizes().items())
        lines += [f"Number of obs: {r.nobs}, groups:  {groups}", "", "Fixed effects:"]
        if self.ddf is None:
            se = r._bse_fe_pd
            est = r._fe_params_pd
            table = [["", "Estimate", "Std. Error", "t value"]]
            for name, col in zip(self.xname_fe, r.model.exog_names, strict=True):
                table.append([name, f"{est[col]:.4g}", f"{se[col]:.4g}", f"{est[col] / se[col]:.3f}"])
        else:
            ct = r.coef_table(self.ddf, self.alpha)
            table = [["", "Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]]
            for name, (_, row) in zip(self.xname_fe, ct.iterrows(), strict=True):
                table.append([name, f"{row['estimate']:.4g}", f"{row['std_err']:.4g}",
                              f"{row['df']:.2f}", f"{row['t']:.3f}", f"{row['p']:.3g}"])
        widths = [max(len(x[i]) for x in table) for i in range(len(table[0]))]
        for x in table:
            lines.append(" ".join(x[i].ljust(widths[i]) if i == 0 else x[i].rjust(widths[i])
                                  for i in range(len(x))).rstrip())
        if r.singular:
            lines += ["", "boundary (singular) fit: see help('isSingular')"]
        if not r.converged:
            lines += ["", f"optimiser did not converge: {r.optsummary.return_code}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        if self.res.model.api == "lme4":
            return self.lme4_text()
        return self.statsmodels_text()

    def statsmodels_text(self) -> str:
        cols = self._columns()
        rows = self.rows()
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        table = [" ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                          enumerate(zip(cols, widths, strict=True)))]
        for r in rows:
            table.append(" ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                  enumerate(zip(r, widths, strict=True))))
        head = self.header()
        hw = [max(len(h[i]) for h in head) for i in range(4)]
        head_lines = [f"{a.ljust(hw[0])} {b.ljust(hw[1])} {c.ljust(hw[2])} {d.ljust(hw[3])}"
                      for a, b, c, d in head]
        width = max(len(table[0]), *(len(h) for h in head_lines))
        title = self.title.center(width)
        lines = [title, "=" * width, *head_lines, "-" * width, table[0], "-" * width,
                 *table[1:], "=" * width]
        if self.res.singular:
            lines.append("boundary (singular) fit: a variance parameter is estimated as zero")
        if not self.res.converged:
            lines.append(f"optimiser did not converge: {self.res.optsummary.return_code}")
        return "\n".join(line.rstrip() for line in lines)

    def as_text(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return "<pre>" + str(self) + "</pre>"

    def __repr__(self) -> str:
        return str(self)
