"""python -m bench offline [--artifact DIR] [--items N] [--repeats R]
python -m bench load [--artifact DIR] [--clients C] [--duration D] [--precision fp32|int8 ...] [--items N]
python -m bench export-memory [--layers L] [--hidden H] [--precisions fp16,fp32]
python -m bench decoder [--shape llama3-8b|tiny] [--device cuda|cpu] [--batches 1,4,16,64] [--seq 1024]
"""

from __future__ import annotations

import sys

from bench import decoder, export_memory, load, offline

WORKLOADS = {
    "offline": offline.main,
    "load": load.main,
    "export-memory": export_memory.main,
    "decoder": decoder.main,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in WORKLOADS:
        sys.exit(f"usage: python -m bench {{{'|'.join(WORKLOADS)}}} [options]  (each has --help)")
    WORKLOADS[sys.argv[1]](sys.argv[2:])
