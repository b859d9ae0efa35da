"""Scoring engines for rescoring: the `Scorer` in this process (`local`), a running service (`remote`), or an
actor pool of Scorers on a Ray cluster (`ray`).

An engine takes shards (a payload and each row's items) and yields, per shard and in order, the payload and
each row's `Scored` items (score, rewards and gating in `objectives` order). `identity` is what a resumed run
must match: the model and the graph it runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from polyreward.models.runtime.items import Item, parse_item


@dataclass(frozen=True)
class Scored:
    score: float
    rewards: list[float]
    gating: list[float]


Shard = tuple[object, list[list[Item]]]  # (the caller's payload, each row's items)


class Engine(Protocol):
    objectives: list[str]
    identity: dict

    def score_shards(self, shards: Iterator[Shard]) -> Iterator[tuple[object, list[list[Scored]]]]: ...

    def close(self) -> None: ...


class _PerShard:
    """Scores shard after shard with `score` (a flat list of items); results regrouped per row, in order."""

    def score(self, items: Sequence[Item]) -> list[Scored]:
        raise NotImplementedError

    def score_shards(self, shards: Iterator[Shard]) -> Iterator[tuple[object, list[list[Scored]]]]:
        for payload, rows in shards:
            yield payload, regroup(self.score([it for items in rows for it in items]), rows)


def regroup(flat: Sequence[Scored], rows: Sequence[Sequence[Item]]) -> list[list[Scored]]:
    out, at = [], 0
    for items in rows:
        out.append(list(flat[at : at + len(items)]))
        at += len(items)
    return out


def model_identity(manifest, precision: str) -> dict:
    graph = manifest.graphs[precision]
    return {
        "model": manifest.name, "version": manifest.version, "objectives": manifest.objective_names,
        "precision": precision, "graph_sha256": manifest.files[graph.file].sha256,
    }  # fmt: skip


class LocalEngine(_PerShard):
    """`Scorer` in this process, with its length-sorted batching under a token budget."""

    def __init__(
        self, artifact, *, precision="auto", device="auto", token_budget: int | None = None, rules=None
    ):  # fmt: skip
        from polyreward.models.runtime.files import sha256_file
        from polyreward.models.runtime.rules import RuleSet
        from polyreward.models.runtime.scorer import Scorer

        self.scorer = Scorer(artifact, precision=precision, device=device, token_budget=token_budget)
        self.rules = RuleSet.load(rules)  # rule objectives follow the learned ones (stripped replies scored)
        self.rules.check(self.scorer.objectives)
        self.objectives = [*self.scorer.objectives, *self.rules.names]
        self.identity = model_identity(self.scorer.manifest, self.scorer.precision)
        if rules is not None:
            self.identity["rules_sha256"] = sha256_file(rules)

    def score(self, items: Sequence[Item]) -> list[Scored]:
        self.rules.check_labels(items)
        results, _, _ = self.rules.score(self.scorer, items)
        return [Scored(r.score, r.rewards, r.gating) for r in results]

    def close(self) -> None:
        self.rules.close()


class RemoteEngine(_PerShard):
    """A running `polyreward serve`, through `polyreward.service.client.RewardClient` (retries with backoff,
    429s honoured):
    requests of `request_items` items, at most `concurrency` in flight."""

    def __init__(
        self, url: str, *, model: str | None = None, api_key: str | None = None, concurrency: int = 4,
        request_items: int = 64,
    ):  # fmt: skip
        from polyreward.service.client import RewardClient

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
        return [Scored(r.raw.score, r.raw.rewards, r.gating or []) for r in response.results]

    def score(self, items: Sequence[Item]) -> list[Scored]:
        chunks = [items[i : i + self.request_items] for i in range(0, len(items), self.request_items)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return [s for part in pool.map(self._request, chunks) for s in part]

    def close(self) -> None:
        self.client.close()


class _ScorerActor:
    """One `Scorer` per Ray actor; a batch is a group of rows, each with its items as JSON."""

    def __init__(self, artifact: str, precision: str, device: str, token_budget: int | None):
        self.engine = LocalEngine(artifact, precision=precision, device=device, token_budget=token_budget)

    def __call__(self, batch: dict) -> dict:
        import json

        import numpy as np

        rows = [[parse_item(it) for it in json.loads(r)] for r in batch["items"]]
        flat = self.engine.score([it for items in rows for it in items])
        scored = [[[s.score, s.rewards, s.gating] for s in row] for row in regroup(flat, rows)]
        return {"index": batch["index"], "scored": np.array([json.dumps(r) for r in scored], dtype=object)}


class RayEngine:
    """Ray Data: `map_batches` over an actor pool, one `Scorer` per actor (`num_gpus` each on a GPU cluster).

    Connects to the running cluster (`ray.init(address=...)`, or a local one). The remaining rows' items are
    put into one dataset, scored as a stream with the input order preserved, and handed back shard by shard,
    so shards are still committed one at a time.
    """

    def __init__(
        self, artifact, *, precision="auto", device="auto", token_budget: int | None = None,
        address: str | None = None, actors: int = 2, num_gpus: float = 0.0, batch_rows: int = 64,
    ):  # fmt: skip
        import ray

        from polyreward.models.runtime.artifact import load_manifest
        from polyreward.models.runtime.session import resolve_precision

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        self.ray = ray
        manifest = load_manifest(artifact)
        # What each actor's Scorer will pick on its device.
        precision = resolve_precision(precision, manifest.graphs, "cuda" if num_gpus > 0 else "cpu")
        self.objectives = manifest.objective_names
        self.identity = model_identity(manifest, precision)
        self.args = {
            "artifact": str(artifact),
            "precision": precision,
            "device": device,
            "token_budget": token_budget,
        }
        self.actors, self.num_gpus, self.batch_rows = actors, num_gpus, batch_rows

    def score_shards(self, shards: Iterator[Shard]) -> Iterator[tuple[object, list[list[Scored]]]]:
        import json

        shards = list(shards)
        rows = [
            {"index": i, "items": json.dumps([it.model_dump(exclude_none=True) for it in items])}
            for i, items in enumerate(items for _, rows in shards for items in rows)
        ]
        if not rows:
            return
        context = self.ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        scored = self.ray.data.from_items(rows).map_batches(
            _ScorerActor, fn_constructor_kwargs=self.args, batch_size=self.batch_rows, concurrency=self.actors,
            num_gpus=self.num_gpus or None, batch_format="numpy",
        )  # fmt: skip
        stream = iter(scored.iter_rows())
        index = 0
        for payload, shard_rows in shards:
            out = []
            for _ in shard_rows:
                row = next(stream)
                if row["index"] != index:  # preserve_order is what keeps shards reproducible: check it
                    raise RuntimeError(f"Ray returned row {row['index']} where row {index} was expected")
                out.append([Scored(s, r, g) for s, r, g in json.loads(row["scored"])])
                index += 1
            yield payload, out

    def close(self) -> None:
        pass
