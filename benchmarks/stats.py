"""Median and spread of repeated measurements (a single run is never reported on its own)."""

from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict:
    """{"median", "min", "max", "spread_pct", "n", "values"}; spread_pct = (max - min) / median."""
    if not values:
        raise ValueError("no measurements")
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": median, "min": lo, "max": hi,
            "spread_pct": 100 * (hi - lo) / median if median else float("nan"),
            "n": len(values), "values": list(values)}
