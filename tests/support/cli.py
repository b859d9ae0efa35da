"""The installed `polyreward` console script, run as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The console script next to this interpreter: the entry point users run.
POLYREWARD = Path(sys.executable).parent / "polyreward"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


def run_cli(
    *args, check: bool = True, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [POLYREWARD, *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"polyreward {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc
