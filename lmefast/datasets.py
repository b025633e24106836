"""Data sets shipped with the package, as pandas DataFrames.

Each loader reads a gzip-compressed CSV from ``lmefast/data`` and gives the columns the types
they have in the R package the data come from: R's numeric (double) columns as float64, R's
integer columns as int64, and R's factors — the grouping factors among them — as pandas
Categoricals with R's levels in R's order (``ordered=True`` where R's factor is ordered).

Licences. lmefast's code is BSD-3-Clause; these data files are not lmefast's work. They are
copies of data sets distributed with R packages under the GNU GPL: lme4 (GPL >= 2:
sleepstudy, Penicillin, Pastes, Dyestuff, InstEval), nlme (GPL >= 2: Orthodont) and geepack
(GPL >= 3: dietox), and are redistributed here under the terms of their source package. Most
were first published in the books and papers named in each loader's docstring. The values
are those of lme4 1.1-31, nlme 3.1-162 and geepack 1.3-9 (checked row by row).

Ordered factors: lmefast's formulas code an ordered Categorical with treatment contrasts, as
an unordered one; R codes ordered factors with polynomial contrasts. The fit is the same,
the fixed-effects coefficients of such a predictor are parametrised differently.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import pandas as pd

__all__ = ["load_dietox", "load_dyestuff", "load_insteval", "load_orthodont", "load_pastes",
           "load_penicillin", "load_sleepstudy"]


def _level_key(level: str) -> tuple[int, float | str]:
    """R's order of the levels of a factor made from a column: numbers by value, text by text."""
    try:
        return (0, float(level))
    except ValueError:
        return (1, level)


def _read(name: str, floats: Sequence[str] = (), ints: Sequence[str] = (),
          factors: dict[str, Sequence[str] | None] | None = None,
          ordered: Sequence[str] = ()) -> pd.DataFrame:
    """Read ``data/<name>.csv.gz``; ``factors`` maps a column to its levels (None: sorted as R
    sorts them when it makes a factor)."""
    factors = factors or {}
    with resources.files("lmefast").joinpath(f"data/{name}.csv.gz").open("rb") as fh:
        df = pd.read_csv(fh, compression="gzip", dtype={c: str for c in factors})
    for col in floats:
        df[col] = df[col].astype("float64")
    for col in ints:
        df[col] = df[col].astype("int64")
    for col, levels in factors.items():
        values = df[col].astype(str)
        if levels is None:
            levels = sorted(values.unique(), key=_level_key)
        df[col] = pd.Categorical(values, categories=list(levels), ordered=col in ordered)
    return df


def load_dietox() -> pd.DataFrame:
    """Growth of 72 pigs weighed weekly for 12 weeks: 861 rows (statsmodels' MixedLM example).

    Columns: Pig (72 levels), Evit (vitamin E dose: Evit000, Evit100, Evit200), Cu (copper
    dose: Cu000, Cu035, Cu175), Litter (21 levels) — factors; Start (weight at the start, kg),
    Weight (kg), Feed (cumulated feed intake, kg; missing in 72 rows) — float64; Time (week,
    1–12) — int64.

    Source: R package geepack, data set ``dietox`` (GPL >= 3); from Lauridsen, Højsgaard &
    Sørensen (1999), "Influence of dietary rapeseed oil, vitamin E, and copper on the
    performance and the antioxidative and oxidative status of pigs", Journal of Animal
    Science 77, 906–916."""
    return _read("dietox", floats=["Start", "Weight", "Feed"], ints=["Time"],
                 factors={"Pig": None, "Evit": None, "Cu": None, "Litter": None})


def load_sleepstudy() -> pd.DataFrame:
    """Reaction times of 18 subjects over 10 days of sleep deprivation: 180 rows.

    Columns: Reaction (average reaction time, ms), Days (days of sleep deprivation, 0–9) —
    float64; Subject — factor, 18 levels ("308" … "372").

    Source: R package lme4, data set ``sleepstudy`` (GPL >= 2); from Belenky et al. (2003),
    "Patterns of performance degradation and restoration during sleep restriction and
    subsequent recovery", Journal of Sleep Research 12, 1–12."""
    return _read("sleepstudy", floats=["Reaction", "Days"], factors={"Subject": None})


def load_penicillin() -> pd.DataFrame:
    """Potency of 6 penicillin samples on 24 plates, every sample on every plate (crossed
    factors): 144 rows.

    Columns: diameter (of the zone of inhibited growth, mm) — float64; plate (24 levels,
    "a" … "x"), sample (6 levels, "A" … "F") — factors.

    Source: R package lme4, data set ``Penicillin`` (GPL >= 2); from Davies & Goldsmith
    (eds., 1972), Statistical Methods in Research and Production, 4th ed., Oliver and Boyd."""
    return _read("Penicillin", floats=["diameter"], factors={"plate": None, "sample": None})


def load_pastes() -> pd.DataFrame:
    """Strength of a paste: 10 delivery batches, 3 casks per batch, 2 assays per cask (casks
    nested in batches): 60 rows.

    Columns: strength — float64; batch (10 levels, "A" … "J"), cask (3 levels, "a", "b", "c":
    the cask within its batch), sample (30 levels, "A:a" … "J:c": batch and cask) — factors.

    Source: R package lme4, data set ``Pastes`` (GPL >= 2); from Davies & Goldsmith (eds.,
    1972), Statistical Methods in Research and Production, 4th ed., Oliver and Boyd."""
    return _read("Pastes", floats=["strength"], factors={"batch": None, "cask": None, "sample": None})


def load_dyestuff() -> pd.DataFrame:
    """Yield of dyestuff from 6 batches of an intermediate product, 5 preparations each: 30 rows.

    Columns: Batch — factor, 6 levels ("A" … "F"); Yield (grams of standard colour) — float64.

    Source: R package lme4, data set ``Dyestuff`` (GPL >= 2); from Davies & Goldsmith (eds.,
    1972), Statistical Methods in Research and Production, 4th ed., Oliver and Boyd."""
    return _read("Dyestuff", floats=["Yield"], factors={"Batch": None})


# nlme's level order of Orthodont's Subject (an ordered factor: boys, then girls)
_ORTHODONT_SUBJECTS = ("M16", "M05", "M02", "M11", "M07", "M08", "M03", "M12", "M13", "M14", "M09",
                       "M15", "M06", "M04", "M01", "M10", "F10", "F09", "F06", "F01", "F05", "F07",
                       "F02", "F08", "F03", "F04", "F11")


def load_orthodont() -> pd.DataFrame:
    """Orthodontic growth of 27 children (16 boys, 11 girls) measured at ages 8, 10, 12 and
    14: 108 rows.

    Columns: distance (pituitary to pterygomaxillary fissure, mm), age (years) — float64;
    Subject — ordered factor, 27 levels in nlme's order ("M16" < "M05" < … < "F11"); Sex —
    factor, levels "Male", "Female". (nlme's groupedData formula and labels are not kept.)

    Source: R package nlme, data set ``Orthodont`` (GPL >= 2); from Potthoff & Roy (1964), "A
    generalized multivariate analysis of variance model useful especially for growth curve
    problems", Biometrika 51, 313–326."""
    return _read("Orthodont", floats=["distance", "age"],
                 factors={"Subject": _ORTHODONT_SUBJECTS, "Sex": ("Male", "Female")},
                 ordered=["Subject"])


# lme4's level order of InstEval's department factor (not sorted)
_INSTEVAL_DEPTS = ("15", "5", "10", "12", "6", "7", "4", "8", "9", "14", "1", "3", "11", "2")


def load_insteval() -> pd.DataFrame:
    """Lecture evaluations at ETH Zurich: 73,421 ratings by 2,972 students of 1,128 lecturers
    (crossed factors).

    Columns: s (student, 2,972 levels), d (lecturer, 1,128 levels), service (0/1: the lecture
    is a service course taught for another department), dept (the lecture's department, 14
    levels in lme4's order) — factors; studage (semesters the student has been enrolled: 2, 4,
    6, 8), lectage (how many semesters back the lecture was given: 1 … 6) — ordered factors;
    y (rating, 1 = poor … 5 = very good) — int64.

    Source: R package lme4, data set ``InstEval`` (GPL >= 2); anonymised lecture evaluations
    by ETH Zurich students, made available by ETH Zurich through lme4. About 0.34 MB
    compressed."""
    return _read("InstEval", ints=["y"],
                 factors={"s": None, "d": None, "studage": None, "lectage": None, "service": None,
                          "dept": _INSTEVAL_DEPTS},
                 ordered=["studage", "lectage"])
