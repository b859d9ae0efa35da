"""What every workload shares: the real data, timing, the artifact and serve settings, JSON lines."""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(os.environ.get("POLYREWARD_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(limit or 1 << 62), f, strict=False)]


def rmb_pairs(n: int) -> list[dict]:
    """n RMB pairwise rows, every 7th of the file's first rows (all subsets, their real length mix)."""
    path = DATA / "rmb/pairwise.jsonl.gz"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; set POLYREWARD_DATA to the shared data directory")
    return jsonl(path, n * 7)[::7][:n]


def pair_items(rows: list[dict]):
    """[chosen_0, rejected_0, chosen_1, ...] as Items (RMB conversations or prompt strings)."""
    from polyreward.models.runtime.items import ChatItem

    items = []
    for r in rows:
        turns = r["conversation"] if "conversation" in r else [{"role": "user", "content": r["prompt"]}]
        items += [
            ChatItem(messages=[*turns, {"role": "assistant", "content": r[side]}])
            for side in ("chosen", "rejected")
        ]
    return items


def heldout_pairs(n: int) -> list[dict]:
    """n RMB pairs from the default recipe's held-out split (configs/default.yaml: rmb, holdout 0.15 by
    pair_uid), never trained on, from the end of the file (the timed items come from its start)."""
    from polyreward.training.data import split_of

    rows = jsonl(DATA / "rmb/pairwise.jsonl.gz")
    held = [r for r in rows if split_of("rmb", str(r["pair_uid"]), 0.15) == "test"]
    return held[-n:]


def accuracy(scores: list[float]) -> float:
    """Share of pairs (chosen, rejected, chosen, ...) whose chosen side scores higher, in percent."""
    return 100 * sum(c > r for c, r in zip(scores[::2], scores[1::2], strict=True)) / (len(scores) // 2)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def artifact_path(given: str | None) -> Path:
    if given:
        return Path(given)
    from polyreward.models.default import default_artifact

    return default_artifact()


def scorer_settings(config: str | None) -> dict:
    """Batching keyword arguments for a Scorer from a `polyreward tune` file (none: the defaults)."""
    if not config:
        return {}
    raw = json.loads(Path(config).read_text())
    return {
        k: raw[k] for k in ("token_budget", "max_batch_items", "threads", "spin") if raw.get(k) is not None
    }


def serve_argv(artifact: Path, precision: str, config: str | None) -> list[str]:
    """`polyreward serve` for one artifact and precision, with a `polyreward tune` file when given."""
    import sys

    argv = [sys.executable, "-m", "polyreward.models.cli", "serve", str(artifact), "--precision", precision]
    return argv + (["--config", config] if config else [])


def score_bodies(items) -> list[bytes]:
    """One single-item /v1/score request body per item (what OpenRLHF's workers send)."""
    return [json.dumps({"items": [it.model_dump(exclude_none=True)]}).encode() for it in items]


def emit(record: dict, as_json: bool) -> dict:
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        print("  ".join(f"{k}={v}" for k, v in record.items() if k not in ("cpu",)), flush=True)
    return record


def add_common(parser) -> None:
    parser.add_argument("--artifact", help="artifact with fp32 and int8 graphs (default: the shipped model)")
    parser.add_argument("--config", help="serve settings JSON from `polyreward tune` (default: the defaults)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
