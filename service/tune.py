"""`polyreward tune ARTIFACT`: measure this machine and write the batching settings `serve` should use.

Each candidate (padded-token budget × item cap) is a `BatchingPolicy`; it scores the same items with the
`Scorer` set up as `serve` sets it up (`polyreward.service.settings.execution`: on a CPU, threads parked, not
spinning, as beside a second worker), a warm-up and then the median of a few timed runs; the fastest is written as a JSON settings file that `polyreward serve --config FILE` (or
POLYREWARD_CONFIG) reads below flags and POLYREWARD_* variables.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from polyreward.models.runtime.batching import BatchingPolicy
from polyreward.models.runtime.files import atomic_write
from polyreward.models.runtime.items import Item
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.runtime.session import resolve_device
from polyreward.service.settings import execution

CPU_BUDGETS = (128, 256, 512, 1024, 2048)
GPU_BUDGETS = (4096, 8192, 16384, 32768, 65536)
CPU_CAPS = (16, 64)
GPU_CAPS = (16, 64, 256)


@dataclass
class Trial:
    token_budget: int
    max_batch_items: int
    items_per_s: float
    tokens_per_s: float


def candidates(kind: str, budgets: list[int] | None) -> list[tuple[int, int]]:
    if kind == "cpu":
        return [(b, cap) for cap in CPU_CAPS for b in budgets or CPU_BUDGETS]
    return [(b, cap) for cap in GPU_CAPS for b in budgets or GPU_BUDGETS]


def measure(scorer: Scorer, items: list[Item], policy: BatchingPolicy, repeats: int) -> float:
    scorer.score(items, policy=policy)  # warm-up: ORT allocates per shape
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        scorer.score(items, policy=policy)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def tune(
    artifact: Path,
    items: list[Item],
    *,
    precision: str = "auto",
    device: str = "auto",
    budgets: list[int] | None = None,
    repeats: int = 3,
    progress=None,
) -> tuple[dict, list[Trial]]:
    """Try every candidate; return (the settings to write, every trial)."""
    device = resolve_device(device)
    kind = "cpu" if device == "cpu" else "gpu"
    run = execution(device)
    scorer = Scorer(artifact, precision=precision, device=device, threads=run.threads, spin=run.spin)
    tokens = sum(e.tokens for e in scorer.tokenize(items))
    trials: list[Trial] = []
    for budget, cap in candidates(kind, budgets):
        seconds = measure(scorer, items, BatchingPolicy(budget, cap), repeats)
        trials.append(Trial(budget, cap, len(items) / seconds, tokens / seconds))
        if progress:
            progress(trials[-1])
    best = max(trials, key=lambda t: t.items_per_s)
    settings = {
        "precision": scorer.precision,
        "device": scorer.device,
        "token_budget": best.token_budget,
        "max_batch_items": best.max_batch_items,
        "tuned": {
            "artifact": str(artifact),
            "model": scorer.manifest.name,
            "provider": scorer.providers[0],
            "items": len(items),
            "real_tokens": tokens,
            "items_per_s": round(best.items_per_s, 2),
            "default_items_per_s": _default_rate(trials, device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    return settings, trials


def _default_rate(trials: list[Trial], device: str) -> float | None:
    """items/s of the untuned default policy, when it was among the candidates."""
    default = BatchingPolicy.for_device(device)
    rates = [
        t.items_per_s
        for t in trials
        if (t.token_budget, t.max_batch_items) == (default.token_budget, default.max_items)
    ]
    return round(rates[0], 2) if rates else None


def write(settings: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(settings, indent=2) + "\n")


def trial_row(t: Trial) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(t).items()}
