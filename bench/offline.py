"""Offline scoring throughput: `Scorer` (fp32, int8) vs a PyTorch eager baseline, same items, same run.

The baseline is what a few lines of transformers do (and OpenRLHF's serve_rm): the same backbone and heads,
batches of 32 in arrival order, each padded to its longest item. Items are real responses from
../shared/data/rmb (their real length distribution), or the packaged samples when the data is absent.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def real_items(n: int):
    from models.inputs import Item
    from models.parity import sample_items

    path = Path(os.environ.get("POLYREWARD_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    path = path / "rmb/pairwise.jsonl.gz"
    if not path.is_file():
        return (sample_items() * (n // 40 + 1))[:n], "packaged samples"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(n * 7), f, strict=False)][::7][:n]
    items = [Item(messages=[*r["conversation"], {"role": "assistant", "content": r["chosen"]}]) for r in rows]
    return items, "rmb pairwise (every 7th of the first rows)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench offline", description=__doc__)
    parser.add_argument(
        "--artifact", default="build/demo/artifact", help="artifact with fp32 and int8 graphs"
    )
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from models.artifact import HEADS_FILE, load_manifest
    from models.heads import load_heads
    from models.scorer import Scorer
    from models.torch_model import build_reward_model, load_backbone, score_torch

    items, source = real_items(args.items)
    manifest = load_manifest(args.artifact)
    scorers = {
        p: Scorer(args.artifact, precision=p, device="cpu") for p in ("fp32", "int8") if p in manifest.graphs
    }
    encoded = scorers["fp32"].encode(items)
    tokens = sum(e.tokens for e in encoded)
    _, backbone, _ = load_backbone(manifest.backbone.id)
    model = build_reward_model(backbone, load_heads(Path(args.artifact) / HEADS_FILE), manifest.backbone.kind)
    pad_id = scorers["fp32"].builder.pad_id

    def torch_eager():
        for start in range(0, len(encoded), 32):
            score_torch(model, encoded[start : start + 32], pad_id=pad_id)

    common = {
        "workload": "offline",
        "items": len(items),
        "real_tokens": tokens,
        "source": source,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    base = timed(torch_eager, args.repeats)
    print(
        json.dumps(
            {**common, "engine": "pytorch-eager-b32", "seconds": base, "items_per_s": len(items) / base}
        )
    )
    for precision, scorer in scorers.items():
        secs = timed(lambda s=scorer: s.score(items), args.repeats)
        print(
            json.dumps(
                {
                    **common,
                    "engine": f"scorer-{precision}",
                    "seconds": secs,
                    "items_per_s": len(items) / secs,
                    "tokens_per_s": tokens / secs,
                    "speedup_vs_pytorch": base / secs,
                }
            )
        )
