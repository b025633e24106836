"""lmefast.datasets: the shipped data equal the R packages' data sets, with R's column types,
and models fitted to them give lme4's numbers."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import case_by_id, load_reference, read_data

import lmefast
from lmefast import datasets

SOURCE = Path(__file__).parents[1] / "lmefast"  # the checkout (the package may be installed)

# Facts read off R (str() of each data set, lme4 1.1-31 / nlme 3.1-162 / geepack 1.3-9):
# column -> "float64", "int64", or (number of levels, first levels, ordered)
R_TYPES = {
    "load_dietox": (861, {"Pig": (72, ["4601", "4602", "4603"], False),
                          "Evit": (3, ["Evit000", "Evit100", "Evit200"], False),
                          "Cu": (3, ["Cu000", "Cu035", "Cu175"], False),
                          "Litter": (21, ["1", "2", "3"], False),
                          "Start": "float64", "Weight": "float64", "Feed": "float64", "Time": "int64"}),
    "load_sleepstudy": (180, {"Reaction": "float64", "Days": "float64",
                              "Subject": (18, ["308", "309", "310", "330"], False)}),
    "load_penicillin": (144, {"diameter": "float64", "plate": (24, ["a", "b", "c"], False),
                              "sample": (6, ["A", "B", "C"], False)}),
    "load_pastes": (60, {"strength": "float64", "batch": (10, ["A", "B", "C"], False),
                         "cask": (3, ["a", "b", "c"], False), "sample": (30, ["A:a", "A:b", "A:c"], False)}),
    "load_dyestuff": (30, {"Batch": (6, ["A", "B", "C"], False), "Yield": "float64"}),
    "load_orthodont": (108, {"distance": "float64", "age": "float64",
                             "Subject": (27, ["M16", "M05", "M02"], True),
                             "Sex": (2, ["Male", "Female"], False)}),
    "load_insteval": (73421, {"s": (2972, ["1", "2", "3"], False), "d": (1128, ["1", "6", "7", "8"], False),
                              "studage": (4, ["2", "4", "6", "8"], True),
                              "lectage": (6, ["1", "2", "3", "4", "5", "6"], True),
                              "service": (2, ["0", "1"], False),
                              "dept": (14, ["15", "5", "10", "12", "6"], False), "y": "int64"}),
}


@pytest.mark.parametrize("loader", sorted(R_TYPES))
def test_columns_have_r_types_and_levels(loader: str) -> None:
    df = getattr(datasets, loader)()
    nrows, columns = R_TYPES[loader]
    assert df.shape == (nrows, len(columns))
    assert list(df.columns) == list(columns)
    for col, want in columns.items():
        if isinstance(want, str):
            assert df[col].dtype == np.dtype(want), col
            continue
        n_levels, first, ordered = want
        assert isinstance(df[col].dtype, pd.CategoricalDtype), col
        cats = [str(c) for c in df[col].cat.categories]
        assert len(cats) == n_levels and cats[:len(first)] == first, col
        assert df[col].dtype.ordered == ordered, col
        assert df[col].notna().all(), col


@pytest.mark.parametrize("loader, name", [
    ("load_dietox", "dietox"), ("load_sleepstudy", "sleepstudy"), ("load_penicillin", "Penicillin"),
    ("load_pastes", "Pastes"), ("load_dyestuff", "Dyestuff"), ("load_orthodont", "Orthodont")])
def test_values_equal_the_reference_copies(loader: str, name: str) -> None:
    shipped, copy = getattr(datasets, loader)(), read_data(name)
    for col in copy.columns:
        if isinstance(shipped[col].dtype, pd.CategoricalDtype):
            assert (shipped[col].astype(str).to_numpy() == copy[col].astype(str).to_numpy()).all(), col
        else:
            np.testing.assert_array_equal(shipped[col].to_numpy(dtype=float),
                                          copy[col].to_numpy(dtype=float), err_msg=col)


def test_insteval_matches_r_sums() -> None:
    df = datasets.load_insteval()
    # sum(y), sum of the student and lecturer ids, sum(as.integer(dept)) (codes in lme4's order)
    assert int(df["y"].sum()) == 235369
    assert int(df["s"].astype(str).astype(int).sum()) == 108853382
    assert int(df["d"].astype(str).astype(int).sum()) == 76413371
    assert int(df["dept"].cat.codes.sum()) + len(df) == 551062
    assert df["studage"].value_counts(sort=False).tolist() == [15406, 16888, 22107, 19020]
    assert df["service"].value_counts(sort=False).tolist() == [41638, 31783]
    assert df["y"].between(1, 5).all()


@pytest.mark.parametrize("case_id, loader", [
    ("sleep_rs", "load_sleepstudy"), ("penicillin_crossed", "load_penicillin"),
    ("pastes_nested", "load_pastes"), ("dyestuff", "load_dyestuff"), ("orthodont", "load_orthodont"),
    ("dietox_cat", "load_dietox")])
def test_fits_on_the_shipped_data_give_lme4s_numbers(case_id: str, loader: str) -> None:
    case = case_by_id(case_id)
    ref = load_reference(case_id, reml=True)
    res = lmefast.lmer(case["lme4"], getattr(datasets, loader)())
    assert res.llf >= ref.loglik - 1e-6 * abs(ref.loglik)
    assert res.llf == pytest.approx(ref.loglik, rel=1e-5)
    expected = {name.replace("CuCu", "Cu[T.Cu") + ("]" if name.startswith("CuCu") else ""): value
                for name, value in ref.fixef.items()}
    if case_id == "orthodont":  # the reference read Sex from a CSV (levels Female, Male); nlme: Male, Female
        expected["(Intercept)"] += expected.pop("SexMale")
        expected["Sex[T.Female]"] = -ref.fixef["SexMale"]
    assert sorted(res.fe_params.index) == sorted(expected)
    for name, value in expected.items():
        assert res.fe_params[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_every_data_file_is_installed_and_the_data_stay_small() -> None:
    files = sorted(p.name for p in (SOURCE / "data").iterdir())
    meson = (SOURCE / "meson.build").read_text()
    installed = sorted(Path(f).name for f in re.findall(r"'(data/[^']+)'", meson))
    assert files == installed
    assert all(f.endswith(".csv.gz") for f in files)
    assert sum((SOURCE / "data" / f).stat().st_size for f in files) < 400_000


def test_loaders_have_their_source_and_licence_in_the_docstring() -> None:
    for name in datasets.__all__:
        doc = getattr(datasets, name).__doc__
        assert "Source: R package" in doc and "GPL" in doc, name
