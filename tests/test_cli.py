"""The command line: the demo and `lmefast fit` on CSV and Parquet files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lmefast.cli import main
from lmefast.datasets import load_dietox

DATA = Path(__file__).parent / "data"


def test_demo_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "Mixed Linear Model Regression Results" in out
    assert "Pig x Time Cov" in out and "REML" in out and "Converged:          Yes" in out
    assert "-2217.0475" in out  # lme4's REML log-likelihood for this model


def test_bundled_dietox_has_the_expected_shape() -> None:
    df = load_dietox()
    assert df.shape == (861, 8)
    assert df["Feed"].isna().sum() > 0


def test_fit_csv_with_variance_component_ml(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit", str(DATA / "Pastes.csv"), "strength ~ 1", "--groups", "batch",
               "--re-formula", "1", "--vc", "cask=0 + C(cask)", "--ml"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cask Var" in out and "Method:" in out and " ML" in out


def test_fit_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "sleep.parquet"
    pd.read_csv(DATA / "sleepstudy.csv").to_parquet(path)
    assert main(["fit", str(path), "Reaction ~ Days", "--groups", "Subject",
                 "--re-formula", "~Days"]) == 0
    assert "-871.8141" in capsys.readouterr().out


def test_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(DATA / "sleepstudy.csv"), "Reaction ~ Nope", "--groups",
                 "Subject"]) == 2
    assert "Nope" in capsys.readouterr().err
    assert main(["fit", "missing.csv", "y ~ x", "--groups", "g"]) == 2
    assert main(["fit", str(DATA / "Pastes.csv"), "strength ~ 1", "--groups", "batch",
                 "--vc", "no-equals-sign"]) == 2


def test_fit_with_an_lme4_formula(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit", str(DATA / "Penicillin.csv"), "diameter ~ 1 + (1|plate) + (1|sample)", "--ml"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plate (Intercept) Var" in out and "sample (Intercept) Var" in out
    assert "-166.0942" in out  # lme4's ML log-likelihood for this model


def test_fit_without_groups_or_random_terms_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(DATA / "sleepstudy.csv"), "Reaction ~ Days"]) == 2
    assert "random-effects term" in capsys.readouterr().err
