"""`polyreward tune ARTIFACT`: measure this machine and write the batching settings `serve` should use.

Each candidate (padded-token budget × item cap) scores the same items with the `Scorer` set up as `serve` sets
it up (on a CPU: threads parked, not spinning, as beside a second worker), a warm-up and then the median of a
few timed runs; the fastest is written as a JSON settings file that `polyreward serve --config FILE` (or
POLYREWARD_CONFIG) reads below flags and POLYREWARD_* variables.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models.inputs import Item
from models.scorer import Scorer, resolve_device

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


def measure(scorer: Scorer, items: list[Item], repeats: int) -> float:
    scorer.score(items)  # warm-up: ORT allocates per shape
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        scorer.score(items)
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
    spin = False if kind == "cpu" else None  # as `serve` runs it: two workers, threads parked between runs
    scorer = Scorer(artifact, precision=precision, device=device, spin=spin)  # type: ignore[arg-type]
    tokens = sum(e.tokens for e in scorer.encode(items))
    trials: list[Trial] = []
    for budget, cap in candidates(kind, budgets):
        scorer.token_budget, scorer.max_batch_items = budget, cap
        seconds = measure(scorer, items, repeats)
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
            "default_items_per_s": _default_rate(trials, kind),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    return settings, trials


def _default_rate(trials: list[Trial], kind: str) -> float | None:
    """items/s of the untuned defaults (512 tokens on CPU, 16384 on GPU; 64 items), when tried."""
    budget = 512 if kind == "cpu" else 16384
    rates = [t.items_per_s for t in trials if (t.token_budget, t.max_batch_items) == (budget, 64)]
    return round(rates[0], 2) if rates else None


def write(settings: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    tmp.replace(out)


def trial_row(t: Trial) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(t).items()}
