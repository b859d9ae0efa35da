"""Long inputs on a decoder: time and peak memory of scoring ONE item of 1k-16k tokens.

Builds a random Qwen2-shaped decoder (default: 16 layers, hidden 1024, 16 query and 4 key/value heads, vocab
32000: about 0.2B parameters) with random MoE heads and exports it twice: with polyreward's attention (the
chunked loop, `polyreward.models.torch.attention`) and, as "today's graph", with transformers' eager
attention (what decoders were exported with before: the [1, H, L, L] scores materialised per layer). Each
(engine, length) runs in a fresh process on random token ids, batch 1, fp32: one warm-up pass, then the
median of --repeats. Engines: `chunked` and `eager-graph` (ONNX
Runtime, CPU) and `torch-sdpa` (PyTorch, transformers' SDPA attention, causal, which on a CPU is its own
flash-attention kernel). Memory: the resident set once loaded, and what the runs added to it at their peak
(the activations: the peak since a reset of VmHWM just before the runs); per engine its least-squares slope in GB per 1k tokens and its growth over the last step
(linear memory: about the length ratio; quadratic: its square). One JSON line per measurement; --doc also writes the section "Long inputs" of docs/performance.md
(replacing the one there: `python -m bench all` does not run this workload, which takes about 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, timed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"
ENGINES = ("chunked", "eager-graph", "torch-sdpa")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per measurement (median)")
    parser.add_argument(
        "--eager-max", type=int, default=8192,
        help="longest length for today's graph (its scores: heads x L^2 x 4 bytes, twice, per layer)",
    )  # fmt: skip
    parser.add_argument("--workdir", default=None, help="where the model and graphs go (default: temporary)")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    parser.add_argument("--doc", action="store_true", help="write the section into docs/performance.md")
    parser.add_argument("--measure", nargs=3, metavar=("ENGINE", "DIR", "LENGTH"), help=argparse.SUPPRESS)


def build(root: Path, layers: int, hidden: int) -> dict[str, Path]:
    """The random backbone, its heads and the two artifacts (chunked and eager attention)."""
    sys.path.insert(0, str(TESTS))
    import torch
    from support.tinymodels import chatml_tokenizer, random_heads
    from transformers import AutoModel, Qwen2Config

    from polyreward.models.torch import reward_model
    from polyreward.models.torch.export import ExportOptions, export_artifact

    backbone = root / "backbone"
    if not backbone.is_dir():
        config = Qwen2Config(
            vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=32768,
            tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(backbone)
        chatml_tokenizer().save_pretrained(backbone)
    heads = random_heads(root / "heads.safetensors", hidden)
    paths = {"chunked": root / "chunked", "eager-graph": root / "eager-graph"}
    options = ExportOptions(precisions=("fp32",), max_length=32768, overwrite=True)
    export_artifact(backbone, heads, paths["chunked"], options)
    chosen = reward_model.attention_for
    reward_model.attention_for = lambda config: "eager"  # today's graph: transformers' eager attention
    try:
        export_artifact(backbone, heads, paths["eager-graph"], options)
    finally:
        reward_model.attention_for = chosen
    return {**paths, "backbone": backbone, "heads": heads}


def measure(engine: str, directory: Path, length: int, repeats: int) -> dict:
    """In this (fresh) process: seconds of one pass over one random item of `length` tokens."""
    import numpy as np

    from polyreward.models.runtime.builder import Encoded

    rng = np.random.default_rng(length)
    item = Encoded(tuple(int(t) for t in rng.integers(10, 32000, length)), length // 2, None, False)
    if engine == "torch-sdpa":
        import torch
        from transformers import AutoModel

        from polyreward.models.torch.heads import load_heads
        from polyreward.models.torch.reward_model import build_reward_model, score_torch

        torch.set_num_threads(os.cpu_count() or 1)
        backbone = AutoModel.from_pretrained(directory / "backbone", attn_implementation="sdpa").eval()
        model = build_reward_model(backbone, load_heads(directory / "heads.safetensors"), "decoder")
        run = lambda: score_torch(model, [item], pad_id=0)  # noqa: E731
    else:
        from polyreward.models.runtime.scorer import Scorer

        scorer = Scorer(directory / engine, precision="fp32", device="cpu", gating_cache=0)
        feeds = scorer.collate([item])
        run = lambda: scorer.forward(feeds)  # noqa: E731
    loaded = _rss_gb()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the resident set now (Linux)
    return {
        "seconds": timed(run, repeats),  # one warm-up pass, then the median of `repeats`
        "loaded_gb": loaded,
        "run_gb": max(_rss_gb("VmHWM") - loaded, 0.0),
    }


def _rss_gb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak since the last reset (VmHWM), Linux."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e9


def run(args) -> list[dict]:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="polyreward-long-"))
    started = time.perf_counter()
    build(root, args.layers, args.hidden)
    params = sum(f.stat().st_size for f in (root / "backbone").glob("*.safetensors")) // 4  # fp32 weights
    common = {
        "workload": "long",
        "params_m": round(params / 1e6),
        "layers": args.layers,
        "hidden": args.hidden,
    }
    emit({**common, "build_s": round(time.perf_counter() - started, 1)}, args.json)
    records = [{**common}]
    for engine in ENGINES:
        points = []
        for length in args.lengths:
            record = {**common, "engine": engine, "tokens": length}
            if engine == "eager-graph" and length > args.eager_max:
                heads = args.hidden // 64
                record["skipped"] = (
                    f"needs about {2 * heads * length**2 * 4 / 1e9:.0f} GB for one layer's scores"
                )
                records.append(emit(record, args.json))
                continue
            argv = [sys.executable, "-m", "bench.long", "--measure", engine, str(root), str(length),
                    "--repeats", str(args.repeats)]  # fmt: skip
            proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
            if proc.returncode:
                record["failed"] = f"exit status {proc.returncode} (out of memory?)"
            else:
                m = json.loads(proc.stdout.strip().splitlines()[-1])
                record |= {
                    "seconds": round(m["seconds"], 2), "tokens_per_s": round(length / m["seconds"]),
                    "loaded_gb": round(m["loaded_gb"], 3), "run_gb": round(m["run_gb"], 3),
                }  # fmt: skip
                points.append((length, m["run_gb"]))
            records.append(emit(record, args.json))
        if len(points) >= 2:
            records.append(emit({**common, "engine": engine, **growth(points)}, args.json))
    return records


def growth(points: list[tuple[int, float]]) -> dict:
    """Least-squares GB per 1k tokens, and how peak memory grew over the last doubling (or step)."""
    xs, ys = [x / 1000 for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    (l1, m1), (l2, m2) = points[-2], points[-1]
    return {
        "slope_gb_per_1k_tokens": round(slope, 3),
        "last_step": f"{l1}->{l2} tokens (x{l2 / l1:g})",
        "run_gb_growth": round(m2 / max(m1, 1e-9), 2),
    }


def section(records: list[dict]) -> str:
    """The Markdown section for docs/performance.md."""
    from bench.report import table

    rows = [r for r in records if "tokens" in r]
    slopes = [r for r in records if "slope_gb_per_1k_tokens" in r]
    head = records[0]
    return "\n".join([
        "## Long inputs (one decoder item, 1k-16k tokens)",
        "",
        f"Generated by `python -m bench long --doc` on {time.strftime('%Y-%m-%d')}. A random Qwen2-shaped decoder "
        f"({head['layers']} layers, hidden {head['hidden']}, {head['params_m']}M parameters, fp32), one item of "
        "random tokens per run, each run in a fresh process that reads its own memory from /proc. `chunked`: polyreward's attention loop (256-token query chunks); `eager-graph`: the same "
        "model exported with transformers' eager attention, as decoders were before; `torch-sdpa`: PyTorch with "
        "transformers' SDPA attention (causal; on a CPU, PyTorch's own flash-attention kernel).",
        "",
        table(rows, ["engine", "tokens", "seconds", "tokens_per_s", "loaded_gb", "run_gb", "skipped", "failed"]),
        "",
        "loaded_gb: resident memory once the model is loaded; run_gb: what scoring the item added to it (peak "
        "RSS during the runs, VmHWM reset before them, - loaded_gb), the activations. slope: least-squares run_gb per 1k tokens; "
        "run_gb_growth: run_gb at the longest length over run_gb at the second-longest (memory linear in length: "
        "about the ratio of the lengths, quadratic: its square).",
        "",
        table(slopes, ["engine", "slope_gb_per_1k_tokens", "last_step", "run_gb_growth"]),
        "",
    ])  # fmt: skip


def write_doc(records: list[dict], path: Path) -> None:
    """Put `section(records)` into `path` in place of its previous version (before the raw measurements)."""
    from bench.report import section_of

    text = path.read_text()
    if old := section_of(text, "## Long inputs"):
        text = text.replace(old, "")
    at = text.index("## Raw measurements") if "## Raw measurements" in text else len(text)
    path.write_text(text[:at] + section(records) + "\n" + text[at:])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench long", description=__doc__)
    add_args(parser)
    args = parser.parse_args(argv)
    if args.measure:
        engine, directory, length = args.measure
        print(json.dumps(measure(engine, Path(directory), int(length), args.repeats)))
        return
    records = run(args)
    if args.doc:
        from bench.report import DOCS

        write_doc(records, DOCS / "performance.md")


if __name__ == "__main__":
    main(sys.argv[1:])
