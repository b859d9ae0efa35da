"""A peer: michaelfeil/infinity serving the same MiniLM backbone as plain embeddings, under the same load.

infinity (`infinity-emb`, its `optimum` ONNX engine on the CPU) returns one embedding per text: less work per
item than polyreward's rewards, gating and score (no heads, and no second pass over the prompt). Clients send
one single-text `/embeddings` request at a time, the text being each item's conversation as polyreward
tokenizes it (truncated the same way). infinity runs from its own virtual environment, which
`python -m bench peer --setup` creates in .venv-infinity (its pins differ from ours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import add_common, artifact_path, emit, pair_items, rmb_pairs
from bench.load import Server, load_line, run_load
from bench.machine import cpu_model

VENV = Path(__file__).resolve().parent.parent / ".venv-infinity"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[64])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--setup", action="store_true", help="create .venv-infinity with infinity-emb first")


MODEL = VENV / "minilm-onnx"


def setup(backbone: Path) -> None:
    """infinity in its own venv, and the backbone exported to ONNX by optimum's exporter, as its engine wants."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU wheel, before anything asks for torch
    subprocess.run([*pip, "infinity-emb[server,optimum]"], check=True)
    export = f"from optimum.exporters.onnx import main_export; main_export({str(backbone)!r}, output={str(MODEL)!r}, task='feature-extraction', opset=17)"
    subprocess.run(
        [str(VENV / "bin" / "python"), "-c", export], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def run(args) -> list[dict]:
    from polyreward.models.runtime.scorer import Scorer

    artifact = artifact_path(args.artifact)
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    if args.setup:
        setup(Path(scorer.manifest.backbone.id))
    binary = VENV / "bin" / "infinity_emb"
    if not (binary.exists() and (MODEL / "model.onnx").exists()):
        print(f"peer: {binary} or {MODEL / 'model.onnx'} missing; run `python -m bench peer --setup` (skipped)",
              file=sys.stderr)  # fmt: skip
        return []
    encoded = scorer.tokenize(pair_items(rmb_pairs(args.pairs)))
    tokenizer = scorer.builder.tokenizer
    texts = [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in encoded]
    bodies = [json.dumps({"model": "minilm", "input": [t]}).encode() for t in texts]
    # From inside the model directory: infinity hands optimum the ONNX file's path as it globbed it, and
    # optimum wants it relative to the model directory.
    argv = [str(binary), "v2", "--model-id", ".", "--served-model-name", "minilm", "--engine", "optimum",
            "--device", "cpu", "--batch-size", "32", "--host", "127.0.0.1"]  # fmt: skip
    common = {"workload": "peer", "items": len(texts), "cpu": cpu_model(), "cores": os.cpu_count(),
              "model": scorer.manifest.backbone.id, "max_tokens": max(len(e.input_ids) for e in encoded)}  # fmt: skip
    records = []
    env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    with Server("infinity", argv, ready_path="/health", env=env, cwd=MODEL) as server:
        for clients in args.clients:
            r = run_load(server, bodies, clients, args.warmup, args.duration, path="/embeddings")
            records.append(emit(load_line(common, "infinity-optimum-embeddings", clients, r), args.json))
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench peer", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
