"""The command line, run as a user runs it: ``python -m lmefast ...`` in a subprocess.

One fit per run; --output (JSON, CSV), --timing, --threads, --ddf, --reml/--ml; every error a
single line on stderr with exit status 2. Numbers are checked against lme4's reference fits."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_reference

import lmefast
from lmefast import datasets
from lmefast.cli import describe_error


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmefast", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    paths = {name: d / f"{name}.csv" for name in ("sleepstudy", "penicillin", "pastes")}
    datasets.load_sleepstudy().to_csv(paths["sleepstudy"], index=False)
    datasets.load_penicillin().to_csv(paths["penicillin"], index=False)
    datasets.load_pastes().to_csv(paths["pastes"], index=False)
    sleep = datasets.load_sleepstudy()
    sleep["Subject"] = sleep["Subject"].astype(str).astype("int64")  # out of core: numeric columns
    paths["parquet_dir"] = d / "sleep_parts"
    paths["parquet_dir"].mkdir()
    sleep.iloc[:90].to_parquet(paths["parquet_dir"] / "part0.parquet")
    sleep.iloc[90:].to_parquet(paths["parquet_dir"] / "part1.parquet")
    paths["parquet"] = d / "sleep.parquet"
    sleep.to_parquet(paths["parquet"])
    paths["empty"] = d / "empty.csv"
    paths["empty"].write_text("")
    paths["header_only"] = d / "header_only.csv"
    paths["header_only"].write_text("Reaction,Days,Subject\n")
    paths["corrupt"] = d / "corrupt.parquet"
    paths["corrupt"].write_bytes(paths["parquet"].read_bytes()[:200])  # truncated
    sleep["Hours"] = 24.0 * sleep["Days"]  # the same predictor again: dropped with a warning
    paths["collinear"] = d / "collinear.csv"
    sleep.to_csv(paths["collinear"], index=False)
    paths["missing"] = d / "missing.csv"
    paths["out"] = d / "out"
    paths["out"].mkdir()
    return paths


# Every run of the module, started together (each pays Python's and lmefast's start-up; run
# side by side they take a fraction of the time). Placeholders name entries of `files`.
ERRORS = {
    "empty CSV": (["{empty}", "y ~ x", "--groups", "g"], "is empty"),
    "header only": (["{header_only}", "Reaction ~ Days", "--groups", "Subject"], "no rows"),
    "corrupt Parquet": (["{corrupt}", "Reaction ~ Days", "--groups", "Subject"], "Parquet"),
    "missing file": (["{missing}", "y ~ x", "--groups", "g"], "does not exist"),
    "formula syntax": (["{sleepstudy}", "Reaction ~ Days +", "--groups", "Subject"], "formula"),
    "formula without ~": (["{sleepstudy}", "Reaction Days", "--groups", "Subject"], "'~'"),
    "unknown column": (["{sleepstudy}", "Reaction ~ Nope", "--groups", "Subject"], "Nope"),
    "unknown group column": (["{sleepstudy}", "Reaction ~ Days + (1 | Nope)"], "Nope"),
    "lme4 formula with --groups": (["{sleepstudy}", "Reaction ~ Days + (Days | Subject)", "--groups",
                                    "Subject"], "drop --groups"),
    "lme4 term in --re-formula": (["{sleepstudy}", "Reaction ~ Days", "--groups", "Subject",
                                   "--re-formula", "~Days | Subject"], "drop --groups"),
    "no random effects": (["{sleepstudy}", "Reaction ~ Days"], "--groups"),
    "re-formula without groups": (["{sleepstudy}", "Reaction ~ Days + (1|Subject)", "--re-formula", "~Days"],
                                  "need --groups"),
    "vc without =": (["{pastes}", "strength ~ 1", "--groups", "batch", "--vc", "cask"], "NAME=FORMULA"),
    "output suffix": (["{sleepstudy}", "Reaction ~ Days", "--groups", "Subject", "--output", "fit.txt"],
                      ".json or .csv"),
    "output not writable": (["{sleepstudy}", "Reaction ~ Days", "--groups", "Subject", "--output",
                             "{missing}/fit.json"], "cannot write"),
    "threads": (["{sleepstudy}", "Reaction ~ Days", "--groups", "Subject", "--threads", "0"], "--threads"),
    "Kenward-Roger out of core": (["{parquet}", "Reaction ~ Days", "--groups", "Subject", "--ddf",
                                   "kenward-roger"], "satterthwaite"),
}
RUNS = {
    "demo": [],
    "help": ["--help"],
    "fit help": ["fit", "--help"],
    "demo help": ["demo", "--help"],
    "json": ["fit", "{sleepstudy}", "Reaction ~ Days", "--groups", "Subject", "--re-formula", "~Days",
             "--ddf", "satterthwaite", "--threads", "2", "--timing", "--output", "{out}/sleep.json"],
    "csv kenward-roger": ["fit", "{penicillin}", "diameter ~ 1 + (1 | plate) + (1 | sample)",
                          "--ddf", "kenward-roger", "--output", "{out}/penicillin.csv"],
    "csv ml residual": ["fit", "{pastes}", "strength ~ 1", "--groups", "batch", "--re-formula", "1",
                        "--vc", "cask=0 + C(cask)", "--ml", "--ddf", "residual",
                        "--output", "{out}/pastes.csv"],
    "parquet": ["fit", "{parquet}", "Reaction ~ Days + (Days | Subject)", "--timing", "--output",
                "{out}/parquet.json"],
    "parquet_dir": ["fit", "{parquet_dir}", "Reaction ~ Days + (Days | Subject)", "--timing", "--output",
                    "{out}/parquet_dir.json"],
    "warning": ["fit", "{collinear}", "Reaction ~ Days + Hours", "--groups", "Subject"],
    "reml and ml": ["fit", "{sleepstudy}", "Reaction ~ Days", "--groups", "Subject", "--ml", "--reml"],
    **{f"error: {case}": ["fit", *args] for case, (args, _) in ERRORS.items()},
}


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    paths = {k: str(v) for k, v in files.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *(a.format(**paths) for a in args), cwd=files["out"])
                   for name, args in RUNS.items()}
        return {name: f.result() for name, f in futures.items()}


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with status 2 and one line on stderr, no traceback, no colour codes."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lmefast: error: ")
    assert "\x1b" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


# -- fits ---------------------------------------------------------------------------------------
Runs = dict[str, subprocess.CompletedProcess[str]]


def test_demo_fits_once_without_a_timing_line(runs: Runs) -> None:
    proc = runs["demo"]
    assert proc.returncode == 0, proc.stderr
    assert "Mixed Linear Model Regression Results" in proc.stdout and "Pig x Time Cov" in proc.stdout
    llf = float(re.search(r"Log-Likelihood:\s+(-?\d+\.\d+)", proc.stdout).group(1))
    assert llf == pytest.approx(load_reference("dietox_rs", reml=True).loglik, abs=1e-3)
    assert "timing" not in proc.stdout and " ms" not in proc.stdout
    assert proc.stderr == ""


def test_json_output_with_satterthwaite_threads_and_timing(runs: Runs, files: dict[str, Path]) -> None:
    proc = runs["json"]
    assert proc.returncode == 0, proc.stderr
    timing = [line for line in proc.stdout.splitlines() if line.startswith("timing:")]
    assert len(timing) == 1 and "one fit" in timing[0] and "evaluations of the objective" in timing[0]
    ref = load_reference("sleep_rs", reml=True)
    rec = json.loads((files["out"] / "sleep.json").read_text())
    assert rec["model"]["method"] == "REML" and rec["model"]["ddf"] == "satterthwaite"
    coefs = {c["term"]: c for c in rec["coefficients"]}
    assert set(coefs) == {"Intercept", "Days"}
    for ours, theirs in (("Intercept", "(Intercept)"), ("Days", "Days")):
        assert coefs[ours]["estimate"] == pytest.approx(ref.fixef[theirs], rel=1e-6)
        assert coefs[ours]["std_err"] == pytest.approx(ref.se_fixef[theirs], rel=1e-4)
        assert coefs[ours]["df"] == pytest.approx(ref.raw["df_satterthwaite"][theirs], rel=1e-3)
    variances = {(v["group"], v["term"], v["term2"]): v["vcov"] for v in rec["variance_components"]}
    assert variances[("Residual", None, None)] == pytest.approx(ref.sigma ** 2, rel=1e-4)
    assert len(variances) == len(ref.varcorr)
    assert rec["fit"]["nobs"] == 180
    assert rec["fit"]["llf"] == pytest.approx(ref.loglik, abs=1e-6)
    assert rec["fit"]["aic"] == pytest.approx(ref.raw["aic"], abs=1e-5)
    assert rec["convergence"]["converged"] is True and rec["convergence"]["singular"] is False
    assert rec["convergence"]["n_evals"] > 0


def _csv_values(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["section", "group", "term", "term2", "statistic", "value"]
    return rows


def test_csv_output_lme4_formula_kenward_roger(runs: Runs, files: dict[str, Path]) -> None:
    proc = runs["csv kenward-roger"]
    assert proc.returncode == 0, proc.stderr
    assert "timing" not in proc.stdout
    ref = load_reference("penicillin_crossed", reml=True)
    rows = _csv_values(files["out"] / "penicillin.csv")
    value = {(r["section"], r["group"], r["term"], r["statistic"]): r["value"] for r in rows}
    assert float(value[("coefficient", "", "(Intercept)", "df")]) == pytest.approx(
        ref.raw["df_kenward_roger"][0], rel=1e-3)
    assert float(value[("coefficient", "", "(Intercept)", "estimate")]) == pytest.approx(
        ref.fixef["(Intercept)"], rel=1e-8)
    for vc in ref.varcorr[:2]:
        assert float(value[("variance", vc["grp"], vc["var1"], "vcov")]) == pytest.approx(vc["vcov"], rel=1e-3)
    assert float(value[("fit", "", "", "llf")]) == pytest.approx(ref.loglik, abs=1e-6)
    assert value[("convergence", "", "", "converged")] == "True"


def test_csv_output_ml_residual_ddf(runs: Runs, files: dict[str, Path]) -> None:
    proc = runs["csv ml residual"]
    assert proc.returncode == 0, proc.stderr
    assert " ML" in proc.stdout
    value = {(r["section"], r["term"], r["statistic"]): r["value"]
             for r in _csv_values(files["out"] / "pastes.csv")}
    ref = load_reference("pastes_nested", reml=False)
    assert float(value[("fit", "", "llf")]) == pytest.approx(ref.loglik, abs=1e-6)
    assert float(value[("coefficient", "Intercept", "df")]) == 59  # residual: n - p


@pytest.mark.parametrize("which", ["parquet", "parquet_dir"])
def test_parquet_is_fitted_out_of_core(runs: Runs, files: dict[str, Path], which: str) -> None:
    proc = runs[which]
    assert proc.returncode == 0, proc.stderr
    assert "out of core" in proc.stdout
    rec = json.loads((files["out"] / f"{which}.json").read_text())
    assert rec["fit"]["llf"] == pytest.approx(load_reference("sleep_rs", reml=True).loglik, abs=1e-6)


def test_help_is_plain_text(runs: Runs) -> None:
    for name in ("help", "fit help", "demo help"):
        proc = runs[name]
        assert proc.returncode == 0
        assert "``" not in proc.stdout and "usage: lmefast" in proc.stdout
    for option in ("--output", "--threads", "--ddf", "--reml", "--ml", "--timing", "--groups"):
        assert option in runs["fit help"].stdout


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line_with_status_2(runs: Runs, case: str) -> None:
    line = one_error_line(runs[f"error: {case}"])
    assert ERRORS[case][1] in line


def test_warnings_are_one_line(runs: Runs) -> None:
    proc = runs["warning"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmefast: warning: ") and "Hours" in lines[0]
    assert "Hours" not in proc.stdout  # the summary has no row for the dropped column


def test_reml_and_ml_exclude_each_other(runs: Runs) -> None:
    proc = runs["reml and ml"]
    assert proc.returncode == 2 and "not allowed" in proc.stderr


def test_formulaic_bar_error_from_mixedlm_becomes_a_clean_hint() -> None:
    with pytest.raises(Exception) as info:
        lmefast.mixedlm("Reaction ~ Days + (Days | Subject)", datasets.load_sleepstudy(),
                        groups="Subject").fit()
    message, hint = describe_error(info.value)
    assert "\x1b" not in message and "\n" not in message and "|" in message
    assert hint is not None and "lmer" in hint and "drop --groups" in hint


def test_bundled_dietox_has_the_expected_shape() -> None:
    df = datasets.load_dietox()
    assert df.shape == (861, 8)
    assert df["Feed"].isna().sum() == 72
    assert isinstance(df["Pig"].dtype, pd.CategoricalDtype)


def test_plot_writes_a_caterpillar_png(files: dict[str, Path]) -> None:
    out = files["out"] / "ranef.png"
    done = run("fit", str(files["penicillin"]), "diameter ~ 1 + (1 | plate) + (1 | sample)", "--plot", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    bad = run("fit", str(files["sleepstudy"]), "Reaction ~ Days + (1 | Subject)", "--plot",
              str(files["out"] / "ranef.txt"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "must end in .png" in bad.stderr
