"""Data sets shipped with the package."""
from __future__ import annotations

from importlib import resources

import pandas as pd


def load_dietox() -> pd.DataFrame:
    """Growth of 72 pigs over 12 weeks (geepack's ``dietox``; statsmodels' MixedLM example).

    Columns: Pig, Evit, Cu, Litter, Start, Weight, Feed (with missing values), Time."""
    with resources.files("lmefast").joinpath("data/dietox.csv").open("r") as fh:
        return pd.read_csv(fh)
