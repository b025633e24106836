"""lme4 formula syntax: ``y ~ x + (1 + x | g) + (1 | h) + (1 + x || g) + (1 | a/b) + (1 | a:b)``.

The formula is split into its fixed part and its random-effects terms; each term becomes a
per-level design (formulaic evaluates the part left of the bar) and a grouping factor.
Terms on the same grouping factor are merged into one term whose T is block-diagonal: an
uncorrelated term ``(1 + x || g)`` is ``(1 | g) + (0 + x | g)``, as in lme4.

``LmerPlan`` turns one chunk of rows into the designs (y, X, the terms, weights, offset), with
the rules of lmefast.formula; a DataFrame in memory is its one chunk (``api.lmer_model``), data
in chunks call it per chunk with each factor's labels fixed (lmefast.chunked_multi).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lmefast.checks import check_missing_policy, check_rows
from lmefast.errors import SpecificationError
from lmefast.formula import (
    Columns,
    RowRules,
    _parse,
    _rhs,
    _variables,
    check_has_columns,
    check_rowwise_columns,
    check_schema,
    design_matrix,
)
from lmefast.structure import Term, factorize_groups


@dataclass(frozen=True)
class RandomTerm:
    """One ``(expr | group)`` term as written (after expanding ``/`` and ``||``)."""

    expr: str
    group: str


def _split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecificationError(f"unbalanced parentheses in {text!r}")
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    if depth != 0:
        raise SpecificationError(f"unbalanced parentheses in {text!r}")
    parts.append(text[start:])
    return parts


def _expand_uncorrelated(expr: str) -> list[str]:
    """``1 + x + z`` under ``||`` → ``["1", "0 + x", "0 + z"]`` (one term per formula term)."""
    terms = list(_parse(_rhs(expr)))
    out = []
    for term in terms:
        name = str(term)
        out.append("1" if name == "1" else f"0 + {name}")
    if not out:
        raise SpecificationError(f"random-effects term ({expr} || ...) has no columns")
    return out


_FACTOR_CALL = re.compile(r"(?<![\w.])(?:as\.)?factor\(")
_GROUP_TOKEN = re.compile(r"`[^`]+`|[^:/`]+|[:/]")


def r_idioms(expr: str) -> str:
    """R's spellings formulaic does not know: ``factor(x)`` / ``as.factor(x)`` → ``C(x)``."""
    return _FACTOR_CALL.sub("C(", expr)


def unquote(name: str) -> str:
    """A column name as written in a formula: ```my column``` → ``my column``."""
    name = name.strip()
    return name[1:-1] if len(name) > 1 and name[0] == name[-1] == "`" else name


def _expand_group(group: str) -> list[str]:
    """The grouping factors of ``a``, ``a:b`` (as written), ``a/b`` → ``["a", "b:a"]`` and
    ``a/b/c`` → ``["a", "b:a", "c:b:a"]`` (lme4's names for nested factors: the inner factor
    first). Column names may be quoted with backticks."""
    tokens = [t.strip() for t in _GROUP_TOKEN.findall(group) if t.strip()]
    if "".join(tokens).replace("`", "") != group.replace(" ", "").replace("`", "") and "`" not in group:
        raise SpecificationError(f"malformed grouping factor {group!r}")
    nests: list[list[str]] = [[]]
    expect_name = True
    for tok in tokens:
        if tok in (":", "/"):
            if expect_name:
                raise SpecificationError(f"malformed grouping factor {group!r}")
            if tok == "/":
                nests.append([])
            expect_name = True
            continue
        if not expect_name:
            raise SpecificationError(f"malformed grouping factor {group!r}")
        nests[-1].append(unquote(tok))
        expect_name = False
    if expect_name or any(not n for n in nests):
        raise SpecificationError(f"malformed grouping factor {group!r}")
    out = []
    for i in range(len(nests)):
        out.append(":".join(name for level in reversed(nests[:i + 1]) for name in level))
    return out


def parse_lmer(formula: str) -> tuple[str, str, list[RandomTerm]]:
    """Split an lme4 formula into (response, fixed-effects right-hand side, random terms)."""
    if not isinstance(formula, str) or "~" not in formula:
        raise SpecificationError(f"formula {formula!r} has no '~'")
    lhs, rhs = formula.split("~", 1)
    response = unquote(lhs)
    if not response:
        raise SpecificationError(f"formula {formula!r} has no response")
    fixed, random = [], []
    for raw in _split_top(rhs, "+"):
        part = raw.strip()
        if not part:
            raise SpecificationError(f"empty term in formula {formula!r}")
        if part.startswith("(") and part.endswith(")") and "|" in part:
            inner = part[1:-1]
            if len(_split_top(inner, "|")) < 2:  # the bar sits inside nested parentheses
                fixed.append(part)
                continue
            double = "||" in inner and len(_split_top(inner, "||")) == 2
            pieces = _split_top(inner, "||") if double else _split_top(inner, "|")
            if len(pieces) != 2 or not pieces[0].strip() or not pieces[1].strip():
                raise SpecificationError(f"malformed random-effects term {part!r}: "
                                         "expected (expr | factor)")
            expr, group = r_idioms(pieces[0].strip()), pieces[1].strip()
            if not re.fullmatch(r"(?:`[^`]+`|[\w.:/ ])+", group):
                raise SpecificationError(f"malformed grouping factor {group!r} in term {part!r}")
            exprs = _expand_uncorrelated(expr) if double else [expr]
            for g in _expand_group(group):
                random.extend(RandomTerm(e, g) for e in exprs)
        else:
            fixed.append(r_idioms(part))
    if not random:
        raise SpecificationError(f"formula {formula!r} has no random-effects term "
                                 "like (1 | group); use an ordinary linear model")
    return response, " + ".join(fixed) if fixed else "1", random


_OFFSET = re.compile(r"^offset\s*\((?P<expr>.*)\)$")


def split_offsets(fixed: str) -> tuple[str, list[str]]:
    """``x + offset(log(t)) + z`` → (``x + z``, [``log(t)``]): lme4's offset terms, taken out of
    the fixed part (an intercept stays unless removed)."""
    parts = [p.strip() for p in _split_top(fixed, "+")]
    offsets = [m["expr"].strip() for p in parts if (m := _OFFSET.match(p))]
    rest = [p for p in parts if not _OFFSET.match(p)]
    return (" + ".join(rest) if rest else "1"), offsets


def offset_values(exprs: list[str], df: pd.DataFrame) -> np.ndarray | None:
    """The sum of the offset terms' values (each one column: a column name or an expression)."""
    total = None
    for e in exprs:
        if e in df.columns:
            v = df[e].to_numpy(dtype=float)
        else:
            M, _ = design_matrix(f"0 + {e}", df)
            if M.shape[1] != 1:
                raise SpecificationError(f"offset({e}) must be one numeric column, got {M.shape[1]}")
            v = M[:, 0]
        total = v if total is None else total + v
    return total


def factor_key(df: pd.DataFrame, group: str) -> pd.Series:
    """The grouping factor's label of each row: a column, or "a:b" labels for an interaction."""
    cols = group.split(":")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SpecificationError(f"grouping factor {group!r}: column(s) {missing} not found in data")
    if len(cols) == 1:
        return df[cols[0]].reset_index(drop=True)
    key = df[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + ":" + df[c].astype(str)
    return key.reset_index(drop=True)


def _factor(df: pd.DataFrame, group: str) -> tuple[np.ndarray, np.ndarray]:
    return factorize_groups(factor_key(df, group))


def build_terms(random: list[RandomTerm], df: pd.DataFrame,
                factor: Callable[[pd.DataFrame, str], tuple[np.ndarray, np.ndarray]] | None = None
                ) -> list[Term]:
    """Evaluate the random terms and merge those on the same factor, in lme4's order.

    lme4 orders the terms by number of levels when they are not already in decreasing order
    (`rev(order(nl))`: ties then come in reverse formula order); θ follows that order. Terms on
    one factor are merged into one Term (columns in formula order) whose pattern lists θ's
    entries in lme4's order; the merged terms come largest first, as the engines need.
    `factor(df, group)` gives a grouping factor's codes and labels (default: from these rows;
    data in chunks pass one with labels fixed across chunks)."""
    factor = factor or _factor
    evaluated = []
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t in random:
        Z, names = design_matrix(t.expr, df)
        if Z.shape[1] == 0:
            raise SpecificationError(f"random-effects term ({t.expr} | {t.group}) has no columns")
        if t.group not in factors:
            factors[t.group] = factor(df, t.group)
            if factors[t.group][1].shape[0] < 2:
                raise SpecificationError(f"grouping factor {t.group!r} has a single level: a "
                                         "random effect needs at least two levels")
        evaluated.append((t.group, Z, ["(Intercept)" if n == "Intercept" else n for n in names]))
    nl = np.array([factors[g][1].shape[0] for g, _, _ in evaluated])
    order = (np.argsort(nl, kind="stable")[::-1] if np.any(np.diff(nl) > 0)
             else np.arange(nl.shape[0]))
    start: dict[str, int] = {}
    col_of = []                      # first column of each term inside its factor's Z
    for g, Z, _ in evaluated:
        col_of.append(start.get(g, 0))
        start[g] = start.get(g, 0) + Z.shape[1]
    patterns: dict[str, tuple[list[int], list[int]]] = {}
    for i in order:                  # θ entries in lme4's order
        g, Z, _ = evaluated[i]
        cols, rows = np.triu_indices(Z.shape[1])      # column-major lower triangle
        pr, pc = patterns.setdefault(g, ([], []))
        pr.extend((rows + col_of[i]).tolist())
        pc.extend((cols + col_of[i]).tolist())
    terms = []
    for g in dict.fromkeys(evaluated[i][0] for i in order):
        parts = [(Z, names) for gg, Z, names in evaluated if gg == g]
        names = [n for _, nn in parts for n in nn]
        if len(set(names)) != len(names):
            raise SpecificationError(f"grouping factor {g!r} has the same column twice in "
                                     f"its random-effects terms: {names}")
        codes, labels = factors[g]
        Z = np.ascontiguousarray(np.column_stack([Z for Z, _ in parts]))
        pr, pc = patterns[g]
        terms.append(Term(g, codes, labels, Z, tuple(names),
                          (np.array(pr, dtype=np.int64), np.array(pc, dtype=np.int64))))
    return terms


@dataclass
class LmerDesigns:
    """One chunk's arrays, for the rows kept (``keep``: which rows of the chunk those are): the
    response, the fixed-effects design and its column names, the random-effects terms, the
    prior weights and the offset (the offset column plus the formula's offset() terms; None
    when there is neither)."""

    y: np.ndarray | None
    X: np.ndarray
    xnames: list[str]
    terms: list[Term]
    keep: np.ndarray
    weights: np.ndarray | None = None
    offset: np.ndarray | None = None


@dataclass
class LmerPlan(RowRules):
    """lme4's spelling (a formula with random-effects terms, weights, offset) resolved into the
    rules that turn one chunk of rows into designs (``evaluate``). Every source calls it: a
    DataFrame in memory once, with all its rows (``labels`` None: each grouping factor's levels
    from the data), data in chunks once per chunk, with each factor's levels fixed by a first
    pass over all chunks (``labels``: factor → sorted labels; lmefast.chunked_multi)."""

    response: str
    fixed: str
    random: list[RandomTerm]
    offset_terms: list[str]
    missing: str
    used: list[str]
    weights: str | None = None         # columns of prior weights and of an offset
    offset: str | None = None
    labels: dict[str, pd.Index] | None = None

    @classmethod
    def from_formula(cls, formula: str, missing: str, weights: str | None = None,
                     offset: str | None = None) -> LmerPlan:
        """The plan; ``weights`` and ``offset`` name columns (lmefast.formula.as_column adds
        arrays as columns first)."""
        check_missing_policy(missing)
        response, fixed, random = parse_lmer(formula)
        fixed, offset_terms = split_offsets(fixed)
        return cls.from_parts(response, fixed, random, offset_terms, missing, weights, offset)

    @classmethod
    def from_parts(cls, response: str, fixed: str, random: list[RandomTerm], offset_terms: list[str],
                   missing: str, weights: str | None = None, offset: str | None = None) -> LmerPlan:
        check_missing_policy(missing)
        used = {response} | _variables(_rhs(fixed))
        used |= set(check_rowwise_columns(weights, offset))
        for t in random:
            used |= _variables(_rhs(t.expr))
            used |= set(t.group.split(":"))
        return cls(response, fixed, random, offset_terms, missing, sorted(used), weights, offset)

    @property
    def fit_only_columns(self) -> list[str]:
        """Columns a fit reads that predictions for new data do not: the response, weights, offset."""
        return [c for c in (self.response, self.weights, self.offset) if c is not None]

    @property
    def factors(self) -> list[str]:
        """The grouping factors (a column, or a:b), in formula order."""
        return list(dict.fromkeys(t.group for t in self.random))

    @property
    def group_columns(self) -> list[str]:
        return sorted({c for t in self.random for c in t.group.split(":")})

    def check_schema(self, dtypes: Any, where: str) -> None:
        """The used columns against a schema (lmefast.formula.check_schema: present, the response
        and the weights and offset numeric); the offset() terms' columns join the used ones."""
        for e in self.offset_terms:
            extra = {e} if e in dtypes else _variables(_rhs(f"0 + {e}"))
            self.used = sorted(set(self.used) | extra)
        self.used, _ = check_schema(dtypes, self.used, self.response, where,
                                    {"weights": self.weights, "offset": self.offset},
                                    keep=tuple(self.group_columns))

    def factor(self, df: pd.DataFrame, group: str) -> tuple[np.ndarray, np.ndarray]:
        """A grouping factor's codes among the plan's labels (−1 for a label not among them)."""
        codes = self.labels[group].get_indexer(factor_key(df, group))
        return codes.astype(np.int64), np.asarray(self.labels[group])

    def evaluate(self, df: pd.DataFrame, where: str, *, need_y: bool = True, need_groups: bool = True,
                 need_x: bool = True, missing: str | None = None, columns: Columns | None = None
                 ) -> LmerDesigns | None:
        """One chunk's designs, for its rows kept: complete rows (or an error, by the missing
        policy: the plan's, or ``missing``) and, with ``need_y`` (the rows of the fit), of
        positive weight. In memory (``labels`` None) the chunk is all the rows: no rows left is
        an error; in chunks a chunk without rows kept gives None. Without ``need_y`` (new data)
        the response, weights and offset are not read; without ``need_groups`` neither are the
        grouping factors (no terms); without ``need_x`` X has no columns."""
        fit_only = self.fit_only_columns
        groups = self.group_columns
        cols = [c for c in self.used if (need_y or c not in fit_only) and (need_groups or c not in groups)]
        check_has_columns(df.columns, cols, where)
        columns = Columns(df) if columns is None else columns
        keep = self.rows_kept(df, where, cols, missing, weighted=need_y, columns=columns)
        if not keep.any():
            if self.labels is None and need_y:
                check_rows(0, dropped=len(df) > 0)
            return None
        if not keep.all():
            df = df.loc[keep]
            columns = Columns(df)
        X, xnames = design_matrix(self.fixed, df, columns=columns) if need_x else (np.zeros((len(df), 0)), [])
        xnames = ["(Intercept)" if c == "Intercept" else c for c in xnames]
        terms = (build_terms(self.random, df, factor=None if self.labels is None else self.factor)
                 if need_groups else [])
        out = LmerDesigns(None, X, xnames, terms, keep)
        if need_y:
            out.y = columns[self.response].to_numpy(dtype=float)
            if self.weights is not None:
                out.weights = columns[self.weights].to_numpy(dtype=float)
            off = offset_values(self.offset_terms, df)
            if self.offset is not None:
                column = columns[self.offset].to_numpy(dtype=float)
                off = column if off is None else column + off
            out.offset = off
        return out
