"""What the benchmarks print with each figure: the machine's load, and p50/p95/max of a list of timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_average() -> str:
    """The one-minute load average, as ``/proc/loadavg`` writes it."""
    return Path("/proc/loadavg").read_text().split()[0]


def summary(name: str, seconds: list[float]) -> str:
    """``name: n=.. p50 .. ms, p95 .. ms, max .. ms`` of timings in seconds."""
    values = np.array(seconds) * 1000
    return (
        f"{name}: n={len(values)} p50 {np.percentile(values, 50):.0f} ms, p95 {np.percentile(values, 95):.0f} ms, "
        f"max {values.max():.0f} ms"
    )
