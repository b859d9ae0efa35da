"""Scoring engines for rescoring: the same `Scorer` in-process (`local`) or a running service (`remote`).

An engine scores a list of items and returns, per item, (score, rewards, gating), rewards and gating in
`objectives` order. `identity` is what a resumed run must match: the model and how it is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from models.inputs import Item


@dataclass(frozen=True)
class Scored:
    score: float
    rewards: list[float]
    gating: list[float]


class Engine(Protocol):
    objectives: list[str]
    identity: dict

    def score(self, items: Sequence[Item]) -> list[Scored]: ...

    def close(self) -> None: ...


class LocalEngine:
    """`Scorer` in this process, with its length-sorted batching under a token budget."""

    def __init__(self, artifact, *, precision="auto", device="auto", token_budget: int | None = None):
        from models.scorer import Scorer

        self.scorer = Scorer(artifact, precision=precision, device=device, token_budget=token_budget)
        self.objectives = self.scorer.objectives
        m = self.scorer.manifest
        self.identity = {
            "model": m.name, "version": m.version, "objectives": self.objectives,
            "precision": self.scorer.precision, "graph_sha256": m.files[m.graphs[self.scorer.precision].file].sha256,
        }  # fmt: skip

    def score(self, items: Sequence[Item]) -> list[Scored]:
        return [Scored(r.score, r.rewards, r.gating) for r in self.scorer.score(items)]

    def close(self) -> None:
        pass


class RemoteEngine:
    """A running `polyreward serve`, through `service.client.RewardClient` (retries with backoff, 429s honoured):
    requests of `request_items` items, at most `concurrency` in flight."""

    def __init__(
        self, url: str, *, model: str | None = None, api_key: str | None = None, concurrency: int = 4,
        request_items: int = 64,
    ):  # fmt: skip
        from service.client import RewardClient

        self.client = RewardClient(url, model=model, api_key=api_key, max_items_per_request=request_items)
        self.request_items, self.concurrency = request_items, concurrency
        info = next((m for m in self.client.models() if model in (None, m["name"])), None)
        if info is None:
            raise ValueError(f"--model: {model!r} is not served at {url}")
        self.model = info["name"]
        self.objectives = info["objectives"]
        self.identity = {
            "model": info["name"], "version": info["version"], "objectives": self.objectives,
            "precision": info["precision"],
        }  # fmt: skip

    def _request(self, items: Sequence[Item]) -> list[Scored]:
        body = [it.model_dump(exclude_none=True) for it in items]
        response = self.client.score(body, return_=["gating"], model=self.model)
        return [Scored(r.score, r.rewards, r.gating or []) for r in response.results]

    def score(self, items: Sequence[Item]) -> list[Scored]:
        chunks = [items[i : i + self.request_items] for i in range(0, len(items), self.request_items)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return [s for part in pool.map(self._request, chunks) for s in part]

    def close(self) -> None:
        self.client.close()
