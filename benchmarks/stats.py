"""Median and spread of repeated measurements (a single run is never reported on its own), and the one
record every benchmark row's timed run returns."""

from __future__ import annotations

import statistics
from typing import NamedTuple


def summarize(values: list[float]) -> dict:
    """{"median", "min", "max", "spread_pct", "n", "values"}; spread_pct = (max - min) / median."""
    if not values:
        raise ValueError("no measurements")
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": median, "min": lo, "max": hi,
            "spread_pct": 100 * (hi - lo) / median if median else float("nan"),
            "n": len(values), "values": list(values)}


class Timed(NamedTuple):
    """One timed generation: prefill = prompt in -> first new token on the CPU; decode = from there to the last."""

    prefill_s: float
    decode_tokens: int  # (new tokens - 1) x batch
    decode_s: float
    tokens: list[int]  # row 0's new tokens (compared across backends)
