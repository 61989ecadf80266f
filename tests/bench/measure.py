"""Shared parts of the benchmarks: summaries, the machine description and the JSON results."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list (``fraction`` from 0 to 1)."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


def summarize_us(samples_ns: list[int]) -> dict[str, float | int]:
    """Return count, min, p50, p99, max and mean of nanosecond samples, in microseconds."""
    values = sorted(sample / 1000 for sample in samples_ns)
    return {
        "count": len(values),
        "min_us": round(values[0], 1),
        "p50_us": round(percentile(values, 0.50), 1),
        "p99_us": round(percentile(values, 0.99), 1),
        "max_us": round(values[-1], 1),
        "mean_us": round(sum(values) / len(values), 1),
    }


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def _read_field(path: str, name: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def describe_machine() -> dict[str, Any]:
    """Read the CPU model, core count, RAM, kernel and Python version of this machine."""
    return {
        "cpu_model": _read_field("/proc/cpuinfo", "model name"),
        "cpus": os.cpu_count(),
        "mem_total": _read_field("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` with the machine and the time to ``results/<name>.json``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    document = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        **results,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
