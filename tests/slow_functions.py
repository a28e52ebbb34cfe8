"""Slow batch functions for fault tests: they give a test time to kill something mid-stage."""

from __future__ import annotations

import time

import pandas as pd


def slow_double(batch: pd.DataFrame, seconds: float = 1.0) -> pd.DataFrame:
    time.sleep(seconds)
    return batch.assign(doubled=batch["id"] * 2)


def noisy_double(batch: pd.DataFrame, seconds: float = 0.0) -> pd.DataFrame:
    """slow_double that prints, as user functions do."""
    print(f"noisy_double: {len(batch)} rows")
    return slow_double(batch, seconds)
