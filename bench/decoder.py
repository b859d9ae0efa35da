"""Decoder reward-model throughput: an ArmoRM-layout Llama imported in fp16, ONNX Runtime vs PyTorch eager.

Builds a checkpoint with random bf16 weights in the shape asked for (`llama3-8b`: ArmoRM-Llama3-8B-v0.1's
backbone, 8.0B parameters; `tiny` for a smoke run), imports it with `polyreward import-armorm --precision fp16`
(peak RSS of that process reported), then scores batches of 1..64 random sequences of `--seq` tokens that
contain the assistant header, with the artifact's graph on `--device` and with PyTorch eager (transformers'
default attention) in fp16 on the same device. Reports tokens/s, the ratio to PyTorch, and model FLOPs
utilisation: (2 x non-embedding parameters x tokens + causal attention FLOPs) / time / `--peak-tflops`.
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import timed

TESTS = Path(__file__).resolve().parents[1] / "tests"
SHAPES = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048,
    },
}  # fmt: skip


def batch_inputs(builder, n: int, seq: int, seed: int) -> list:
    """n encoded items of exactly `seq` tokens: random ids around a real assistant header."""
    import numpy as np

    from polyreward.models.runtime.builder import Encoded
    from polyreward.models.torch.armorm import ASSISTANT_HEADER

    rng = np.random.default_rng(seed)
    header = builder.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    vocab = len(builder.tokenizer)
    out = []
    for _ in range(n):
        ids = rng.integers(8, vocab, seq).tolist()
        at = seq // 2
        ids[at : at + len(header)] = header
        out.append(Encoded(tuple(ids), at, None, False))
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench decoder", description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16 peak (H100 SXM: 989)")
    parser.add_argument("--workdir", default=None, help="keep the checkpoint and artifact here")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(TESTS))  # the checkpoint writer the ArmoRM tests use
    from armorm_reference import tiny_armorm

    from polyreward.models.runtime.scorer import Scorer
    from polyreward.models.torch.armorm import load_armorm

    root = Path(args.workdir or tempfile.mkdtemp(prefix="polyreward-decoder-"))
    checkpoint, artifact = root / "checkpoint", root / "artifact"
    shape = SHAPES[args.shape]
    if not (checkpoint / "config.json").exists():
        tiny_armorm(checkpoint, shape)
    if not (artifact / "manifest.json").exists():
        t = time.perf_counter()
        proc = subprocess.Popen(
            [Path(sys.executable).parent / "polyreward", "import-armorm", checkpoint, "--out", artifact,
             "--precision", "fp16"]
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            sys.exit(f"import-armorm failed ({status})")
        print(json.dumps({"import_s": round(time.perf_counter() - t, 1), "import_peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}), flush=True)  # fmt: skip

    scorer = Scorer(artifact, precision="fp16", device=args.device, token_budget=1 << 30)
    _, model, _ = load_armorm(checkpoint, dtype=torch.float16)
    model.backbone.set_attn_implementation("sdpa")  # the baseline gets transformers' fast attention
    model = model.to(args.device)
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    params = sum(p.numel() for p in model.backbone.parameters()) - model.backbone.embed_tokens.weight.numel()

    for n in map(int, args.batches.split(",")):
        batch = batch_inputs(scorer.builder, n, args.seq, seed=n)
        feeds = scorer.collate(batch)
        tensors = [torch.from_numpy(feeds[k]).to(args.device) for k in model.input_names()]

        def run_torch(tensors=tensors):
            with torch.inference_mode():
                model(*tensors)
            if args.device == "cuda":
                torch.cuda.synchronize()

        tokens = n * args.seq
        flops = 2 * params * tokens + layers * n * 2 * d * args.seq**2  # matmuls + causal QK^T and AV
        ort_s = timed(lambda feeds=feeds: scorer.forward(feeds), args.repeats)
        torch_s = timed(run_torch, args.repeats)
        for engine, s in (("onnxruntime", ort_s), ("pytorch_eager", torch_s)):
            print(json.dumps({
                "engine": engine, "device": args.device, "providers": scorer.providers[:1], "batch": n,
                "seq": args.seq, "tokens_per_s": round(tokens / s), "ms": round(s * 1e3, 1),
                "mfu": round(flops / s / (args.peak_tflops * 1e12), 4),
                **({"vs_pytorch": round(torch_s / ort_s, 2)} if engine == "onnxruntime" else {}),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
