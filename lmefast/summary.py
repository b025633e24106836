"""The summary table, in statsmodels' layout."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from lmefast.results import MixedLMResults


def _fmt(x: float, nd: int = 3) -> str:
    return "" if not np.isfinite(x) else f"{x:.{nd}f}"


class Summary:
    """Header of model facts, then one row per parameter: Coef., Std.Err., z, P>|z|, CI."""

    def __init__(self, res: MixedLMResults, alpha: float = 0.05, ddf: str | None = None) -> None:
        self.res = res
        self.alpha = alpha
        self.ddf = ddf

    def header(self) -> list[tuple[str, str, str, str]]:
        r = self.res
        all_sizes = r._group_sizes()
        sizes = next(iter(all_sizes.values()))
        groups = (str(len(sizes)) if len(all_sizes) == 1 else
                  ", ".join(f"{name} {len(v)}" for name, v in all_sizes.items()))
        return [
            ("Model:", "MixedLM", "Dependent Variable:", r.model.endog_names),
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
            for name, row in ct.iterrows():
                out.append([name, _fmt(row["estimate"]), _fmt(row["std_err"]), _fmt(row["df"], 2),
                            _fmt(row["t"]), _fmt(row["p"]), _fmt(row["ci_lower"]), _fmt(row["ci_upper"])])
            for name, val, se in r._variance_rows():
                out.append([name, _fmt(val), _fmt(se), "", "", "", "", ""])
            return out
        for name in r.model.exog_names:
            est, se = r.fe_params[name], r.bse_fe[name]
            z = est / se
            p = 2 * stats.norm.sf(abs(z))
            out.append([name, _fmt(est), _fmt(se), _fmt(z, 3), _fmt(p), _fmt(est - q * se),
                        _fmt(est + q * se)])
        for name, val, se in r._variance_rows():
            out.append([name, _fmt(val), _fmt(se), "", "", "", ""])
        return out

    def __str__(self) -> str:
        lo, hi = f"[{self.alpha / 2:.3f}", f"{1 - self.alpha / 2:.3f}]"
        cols = ["", "Coef.", "Std.Err.", "z", "P>|z|", lo, hi] if self.ddf is None else \
            ["", "Coef.", "Std.Err.", "df", "t", "P>|t|", lo, hi]
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
        title = "Mixed Linear Model Regression Results".center(width)
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
