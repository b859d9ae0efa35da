"""This machine: CPU model, cores, and its measured fp32 GEMM rate (the ceiling useful GFLOP/s is read against)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix multiply n×n by n×n through numpy's BLAS on every core: the best of `repeats` runs, in
    GFLOP/s (a ceiling; on a shared machine the median wanders with the neighbours)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b  # warm-up: threads start, pages fault in
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - started)
    return 2 * n**3 / min(runs) / 1e9


def run(_args=None) -> list[dict]:
    return [
        {
            "workload": "machine",
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "gemm_gflops": round(gemm_gflops(), 1),
            "python": platform.python_version(),
        }
    ]
