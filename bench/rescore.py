"""`polyreward rescore` throughput (rows/s, a row is one pair): the local engine (the Scorer in process) and the
remote engine (a running `polyreward serve`), on the same RMB pairs, each a real CLI run into a fresh --out."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_common, artifact_path, emit, rmb_pairs, serve_argv
from bench.load import Server
from bench.machine import cpu_model

MAP = ["messages=conversation", "chosen=chosen", "rejected=rejected", "id=pair_uid"]


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])


def rescore_cli(source: Path, out: Path, engine_args: list[str], precision: str) -> dict:
    """One `polyreward rescore` run; its summary.json (rows/s is scoring time, without startup)."""
    import subprocess

    maps = [arg for m in MAP for arg in ("--map", m)]
    argv = [sys.executable, "-m", "polyreward.models.cli", "rescore", str(source), "--out", str(out), "--kind", "pairs",
            "--precision", precision, *maps, *engine_args]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(
        argv, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def run(args) -> list[dict]:
    artifact = artifact_path(args.artifact)
    common = {"workload": "rescore", "pairs": args.pairs, "precision": args.precision, "cpu": cpu_model(),
              "cores": os.cpu_count()}  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-rescore-") as tmp:
        source = Path(tmp) / "rmb.jsonl.gz"
        with gzip.open(source, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rmb_pairs(args.pairs))
        for name in ("local", "remote"):
            if name == "local":
                summary = rescore_cli(source, Path(tmp) / name, ["--artifact", str(artifact)], args.precision)
            else:
                with Server("rescore-remote", serve_argv(artifact, args.precision, args.config)) as server:
                    summary = rescore_cli(source, Path(tmp) / name, ["--url", server.url], args.precision)
            records.append(emit({
                **common, "engine": name, "rows": summary["rows"], "rows_per_s": summary["rows_per_s"],
                "wall_seconds": round(summary["wall_seconds"], 1), "accuracy": summary.get("pairs", {}).get("accuracy"),
            }, args.json))  # fmt: skip
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench rescore", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
