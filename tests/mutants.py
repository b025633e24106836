"""Mutation check of the test suite (a developer tool, not part of the suite).

Each mutant makes one public result of models with a random slope slightly wrong; the suite (the
test files that cover that result) must fail. For each mutant this runs pytest in a subprocess with
this file loaded as a plugin (it applies the mutant named by $LMEFAST_MUTANT at start-up) and
reports whether the mutant was caught, and by which test first.

    python tests/mutants.py                 # all mutants, then a baseline run that must pass
    python tests/mutants.py bse_fe scale    # some of them

Results are patched through public names only (results properties, functions of lmefast.inference
and lmefast.profile), so that the script survives a reorganisation of the library: adapt PATCHES.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ENV = "LMEFAST_MUTANT"

# mutant → (what is made wrong, the test files that should catch it)
MUTANTS: dict[str, tuple[str, list[str]]] = {
    "random_effects": ("conditional modes x 1.01",
                       ["test_reference.py", "test_lmer.py", "test_lmer_condvar.py"]),
    "random_effects_cov": ("conditional variances x 1.05",
                           ["test_reference.py", "test_lmer.py", "test_lmer_condvar.py"]),
    "bse_fe": ("fixed-effect standard errors x 1.01", ["test_reference.py", "test_lmer.py"]),
    "scale": ("residual variance x 1.001", ["test_reference.py", "test_lmer.py"]),
    "satterthwaite_df": ("Satterthwaite df x 1.01", ["test_inference.py"]),
    "kenward_roger_df": ("Kenward-Roger df x 1.01", ["test_inference.py"]),
    "profile_bounds": ("profile interval bounds moved 1% outwards", ["test_inference.py"]),
}


def has_random_slope(res: Any) -> bool:
    """A term with more than one random coefficient (an intercept and a slope)."""
    terms = getattr(res.model, "terms", None)
    if terms is not None:
        return max(t.k for t in terms) >= 2
    return int(res.model.k_re) >= 2


def _scaled(x: Any, factor: float) -> Any:
    if isinstance(x, dict):
        return {k: _scaled(v, factor) for k, v in x.items()}
    if isinstance(x, pd.Series | pd.DataFrame | np.ndarray):
        return x * factor
    return float(x) * factor


def _wrap_attribute(cls: type, name: str, factor: float) -> None:
    """cls.name (a property or cached_property defined on cls) × factor on random-slope models."""
    attr = cls.__dict__[name]
    orig = attr.func if isinstance(attr, cached_property) else attr.fget

    def mutated(self: Any) -> Any:
        value = orig(self)
        return _scaled(value, factor) if has_random_slope(self) else value

    if isinstance(attr, cached_property):
        prop: Any = cached_property(mutated)
        prop.__set_name__(cls, name)
    else:
        prop = property(mutated)
    setattr(cls, name, prop)


def _wrap_function(module: Any, name: str, mutate: Callable[[Any, Any], Any]) -> None:
    """module.name(res, ...) → mutate(res, result) on random-slope models."""
    orig = getattr(module, name)

    def mutated(res: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(res, *args, **kwargs)
        return mutate(res, out) if has_random_slope(res) else out

    setattr(module, name, mutated)


def _result_classes() -> list[type]:
    import lmefast
    return [lmefast.MixedLMResults]   # one results class for every engine


def _patch_modes() -> None:
    for cls in _result_classes():
        for name in ("random_effects", "random_effects_frame"):
            if name in cls.__dict__:
                _wrap_attribute(cls, name, 1.01)


def _patch_condvar() -> None:
    for cls in _result_classes():
        if "random_effects_cov" in cls.__dict__:
            _wrap_attribute(cls, "random_effects_cov", 1.05)


def _patch_bse() -> None:
    import lmefast
    _wrap_attribute(lmefast.MixedLMResults, "bse_fe", 1.01)


def _patch_scale() -> None:
    import lmefast
    _wrap_attribute(lmefast.MixedLMResults, "scale", 1.001)
    _wrap_attribute(lmefast.MixedLMResults, "sigma", float(np.sqrt(1.001)))


def _patch_satterthwaite() -> None:
    from lmefast import inference
    _wrap_function(inference, "satterthwaite_df", lambda res, df: df * 1.01)


def _patch_kenward_roger() -> None:
    from lmefast import inference
    _wrap_function(inference, "kenward_roger_df", lambda res, df: df * 1.01)


def _patch_profile() -> None:
    from lmefast import profile

    def widen(res: Any, ci: pd.DataFrame) -> pd.DataFrame:
        lo, hi = ci.iloc[:, 0], ci.iloc[:, 1]
        out = ci.copy()
        out.iloc[:, 0] = lo - 0.01 * lo.abs()
        out.iloc[:, 1] = hi + 0.01 * hi.abs()
        return out

    _wrap_function(profile, "profile_intervals", widen)


PATCHES: dict[str, Callable[[], None]] = {
    "random_effects": _patch_modes,
    "random_effects_cov": _patch_condvar,
    "bse_fe": _patch_bse,
    "scale": _patch_scale,
    "satterthwaite_df": _patch_satterthwaite,
    "kenward_roger_df": _patch_kenward_roger,
    "profile_bounds": _patch_profile,
}


# -- as a pytest plugin (inside the subprocess) ----------------------------------------------------
def pytest_configure(config: Any) -> None:
    name = os.environ.get(ENV)
    if name:
        PATCHES[name]()


# -- as a script -------------------------------------------------------------------------------------
def run(name: str | None, files: list[str]) -> tuple[bool, str, float]:
    """(suite failed, first failing test, seconds) for one mutant (None: no mutant)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop(ENV, None)
    if name:
        env[ENV] = name
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "mutants", "-p", "no:cacheprovider",
           *[str(HERE / f) for f in files]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    seconds = time.perf_counter() - t0
    first = next((line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")), "")
    if proc.returncode not in (0, 1):  # an error of this script or of pytest, not a caught mutant
        raise RuntimeError(f"pytest exit code {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.returncode == 1, first, seconds


def main(argv: list[str]) -> int:
    names = argv or list(MUTANTS)
    rows = []
    for name in names:
        what, files = MUTANTS[name]
        caught, first, seconds = run(name, files)
        rows.append((name, what, "caught" if caught else "SURVIVED", first, seconds))
        print(f"{name:20s} {what:45s} {rows[-1][2]:9s} {seconds:6.1f}s  {first}", flush=True)
    all_files = sorted({f for _, files in MUTANTS.values() for f in files})
    failed, first, seconds = run(None, all_files)
    print(f"{'(no mutant)':20s} {'baseline: the same files must pass':45s} "
          f"{'FAILED' if failed else 'passed':9s} {seconds:6.1f}s  {first}")
    return int(failed or any(r[2] != "caught" for r in rows))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
