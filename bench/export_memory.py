"""Peak memory and time of `polyreward import-armorm` on a large random ArmoRM-layout checkpoint.

Builds a Llama-shaped checkpoint with random bf16 weights (default: 24 layers of hidden 1536, ~0.85B
parameters: 1.7 GB in bf16, a 3.4 GB fp32 graph, over ONNX's 2 GB protobuf limit, so external data is used),
then imports it once per precision in a fresh process and reports the child's peak RSS against the size of
the weights in that precision. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench export-memory", description=__doc__)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--precisions", default="fp16,fp32", help="one import per comma-separated entry")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(TESTS))  # the checkpoint writer the ArmoRM tests use
    from armorm_reference import tiny_armorm

    root = Path(args.workdir or tempfile.mkdtemp(prefix="polyreward-export-memory-"))
    shape = {
        "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 128, "num_key_value_heads": max(1, args.hidden // 512),
        "vocab_size": args.vocab, "max_position_embeddings": 8192,
    }  # fmt: skip
    t = time.perf_counter()
    checkpoint = tiny_armorm(root / "checkpoint", shape)
    weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    params = weights // 2
    print(
        json.dumps(
            {
                "checkpoint_gb": round(weights / 1e9, 2),
                "params": params,
                "build_s": round(time.perf_counter() - t, 1),
            }
        ),
        flush=True,
    )
    cli = Path(sys.executable).parent / "polyreward"
    for precision in args.precisions.split(","):
        out = root / f"artifact-{precision}"
        t = time.perf_counter()
        proc = subprocess.Popen(
            [cli, "import-armorm", checkpoint, "--out", out, "--precision", precision, "--overwrite"]
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        if status:
            sys.exit(f"import-armorm --precision {precision} failed ({status})")
        peak_kb = usage.ru_maxrss
        model_bytes = params * (2 if precision == "fp16" else 4)
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data")}
        print(json.dumps({
            "precision": precision, "seconds": round(time.perf_counter() - t, 1),
            "peak_rss_gb": round(peak_kb * 1024 / 1e9, 2), "weights_gb": round(model_bytes / 1e9, 2),
            "peak_over_weights": round(peak_kb * 1024 / model_bytes, 2),
            "graph_files": {k: round(v / 1e9, 3) for k, v in files.items()},
        }), flush=True)  # fmt: skip
        shutil.rmtree(out)
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main(sys.argv[1:])
