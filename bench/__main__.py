"""python -m bench offline [--artifact DIR] [--items N] [--repeats R]
python -m bench load [--artifact DIR] [--clients C] [--duration D] [--precision fp32|int8 ...] [--items N]
"""

from __future__ import annotations

import sys

from bench import load, offline

WORKLOADS = {"offline": offline.main, "load": load.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in WORKLOADS:
        sys.exit(f"usage: python -m bench {{{'|'.join(WORKLOADS)}}} [options]  (each has --help)")
    WORKLOADS[sys.argv[1]](sys.argv[2:])
