"""`Scorer`: score conversations with an artifact's ONNX graph in length-sorted batches. No torch.

The scorer is the engine behind `polyreward score`, the service and dataset rescoring. Its phases have names
of their own, so a server can run them on different threads: `tokenize` (items → `Encoded`), `plan` (batches
under the batching policy), `collate` (one padded batch → the graph's inputs), `forward` (ONNX Runtime) and
`results` (graph outputs → one `ScoreResult` per item). `score` chains them and returns results in input order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from polyreward.models.runtime.artifact import TOKENIZER_DIR, load_manifest, verify_graph
from polyreward.models.runtime.batching import BatchingPolicy, collate
from polyreward.models.runtime.builder import Encoded, InputBuilder
from polyreward.models.runtime.gating_cache import DEFAULT_ITEMS, Feeds, GatingCache, apply, prompt_key
from polyreward.models.runtime.items import Item, parse_item
from polyreward.models.runtime.manifest import Manifest, Precision, Truncation
from polyreward.models.runtime.session import (
    Device,
    create_session,
    falls_back,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger("polyreward.scorer")


@dataclass(frozen=True)
class ScoreResult:
    score: float
    rewards: list[float]  # one per objective, in `Scorer.objectives` order
    gating: list[float]
    tokens: int
    truncated: bool
    uncertainty: list[float] | None = None  # posterior std per objective, when the heads carry it
    # mixture heads (`manifest.head.groups`): the router's probabilities [M], each group's score [M] and
    # weighting of the debiased objectives [M][K]
    group_probs: list[float] | None = None
    group_scores: list[float] | None = None
    group_gating: list[list[float]] | None = None

    @classmethod
    def from_outputs(cls, encoded: Encoded, row: dict[str, np.ndarray]) -> ScoreResult:
        """One item's result from its row of the graph outputs."""
        optional = {
            name: row[name].tolist()
            for name in ("uncertainty", "group_probs", "group_scores", "group_gating")
            if name in row
        }
        return cls(
            score=float(row["score"]),
            rewards=row["rewards"].tolist(),
            gating=row["gating"].tolist(),
            tokens=encoded.tokens,
            truncated=encoded.truncated,
            **optional,
        )


class Scorer:
    """Loads an artifact (checking its files' sha256) and scores items with ONNX Runtime.

    precision: which graph to run (`polyreward.models.runtime.session.resolve_precision`; "auto": fp16 on a GPU
    when the artifact has it, else fp32). device: "auto" uses CUDA when onnxruntime-gpu sees a GPU, else the
    CPU; a GPU provider that was asked for but is not the one the session runs on is reported loudly
    (`fallback` is then True). token_budget / max_batch_items: the default `policy`
    (`BatchingPolicy.for_device`). threads / spin / nice: ONNX Runtime's intra-op threads, their spinning and
    their nice value (`polyreward.models.runtime.session.create_session`).
    gating_cache: prompts whose gating weights are remembered across batches and calls
    (`polyreward.models.runtime.gating_cache`; encoder models with a recorded transform; 0: off).
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        precision: Precision | str = "auto",
        device: Device | str = "auto",
        token_budget: int | None = None,
        max_batch_items: int | None = None,
        threads: int | None = None,
        spin: bool | None = None,
        nice: int = 0,
        gating_cache: int = DEFAULT_ITEMS,
    ):
        from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: that imports torch when present

        self.artifact = Path(artifact)
        self.device = resolve_device(device)
        self.manifest: Manifest = load_manifest(self.artifact)
        self.precision: Precision = resolve_precision(precision, self.manifest.graphs, self.device)
        verify_graph(self.artifact, self.manifest, self.precision)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.artifact / TOKENIZER_DIR)
        self.builder = InputBuilder(tokenizer, self.manifest.backbone.kind, self.manifest.input)
        self.policy = BatchingPolicy.for_device(self.device, token_budget, max_batch_items)
        self._graph = self.artifact / self.manifest.graphs[self.precision].file
        self._threads, self._spin = threads, spin
        self.session = create_session(self._graph, self.device, threads=threads, spin=spin, nice=nice)
        self.providers: list[str] = self.session.get_providers()
        self.fallback = falls_back(self.session, self.device)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        cacheable = "prompt_input_ids" in self.input_names and self.manifest.transform is not None
        self.gating_cache = GatingCache(gating_cache) if cacheable and gating_cache > 0 else None
        self._transform = np.array(self.manifest.transform or [], np.float32)
        self._stand_in = (self.builder.pad_id,)  # the one-token prompt of an item whose gating is cached

    @property
    def objectives(self) -> list[str]:
        return self.manifest.objective_names

    # -- the phases ------------------------------------------------------------------------------------

    def tokenize(self, items: Sequence[Item | dict], truncation: Truncation | None = None) -> list[Encoded]:
        """Validate and tokenize items; raises `InputRejected` naming `items[i]` for an item this model refuses."""
        return self.builder.build([parse_item(it, f"items[{i}]") for i, it in enumerate(items)], truncation)

    def plan(self, encoded: Sequence[Encoded], policy: BatchingPolicy | None = None) -> list[list[int]]:
        """Indices of `encoded`, grouped into length-sorted batches under the policy."""
        return (policy or self.policy).plan([e.tokens for e in encoded])

    def collate(
        self, batch: Sequence[Encoded], policy: BatchingPolicy | None = None
    ) -> dict[str, np.ndarray]:
        """Pad one batch into the graph's inputs (a server does this while the previous batch runs).

        Items whose prompt is in the gating cache get a one-token stand-in prompt (`forward` puts their gating
        back); the cache is skipped with `dedup_prompts` off, the baseline where every item has its own pass.
        """
        dedup = (policy or self.policy).dedup_prompts
        cached: dict[int, dict[str, np.ndarray]] = {}
        fill: dict[int, bytes] = {}
        if self.gating_cache is not None and dedup:
            batch = list(batch)
            for row, e in enumerate(batch):
                key = prompt_key(e.prompt_ids or ())
                if (remembered := self.gating_cache.get(key)) is None:
                    fill[row] = key
                else:
                    cached[row], batch[row] = remembered, replace(e, prompt_ids=self._stand_in)
        arrays = collate(
            batch,
            kind=self.builder.kind,
            pad_id=self.builder.pad_id,
            padding_side=self.manifest.input.padding_side,
            dedup_prompts=dedup,
        )
        return Feeds({name: arrays[name] for name in self.input_names}, cached, fill)

    def second_session(self, threads: int | None = None, nice: int = 0):
        """Another session on the same graph and spinning, with `threads` (default the scorer's) at `nice`
        (default the process's priority). A server's express lane runs on one while the batches run on `session`
        at a lower priority, and a batch that starts beside another runs on a one-thread session."""
        threads = threads or self._threads
        return create_session(self._graph, self.device, threads=threads, spin=self._spin, nice=nice)

    def forward(self, feeds: dict[str, np.ndarray], session=None) -> dict[str, np.ndarray]:
        """Collated inputs through the graph (on `session`, default the scorer's own):
        {rewards [N,K], gating [N,K], score [N], uncertainty? [N,K]}."""
        run = (session or self.session).run
        outputs = dict(zip(self.output_names, run(self.output_names, feeds), strict=True))
        if self.gating_cache is not None and isinstance(feeds, Feeds):
            outputs = apply(self.gating_cache, feeds, outputs, self._transform)
        return outputs

    def results(self, batch: Sequence[Encoded], outputs: dict[str, np.ndarray]) -> list[ScoreResult]:
        """One result per item of the batch, from the graph's outputs for it."""
        return [
            ScoreResult.from_outputs(e, {k: v[row] for k, v in outputs.items()})
            for row, e in enumerate(batch)
        ]

    def prime_gating(self, encoded: Sequence[Encoded], policy: BatchingPolicy | None = None) -> int:
        """Put the gating weights of every distinct prompt of `encoded` not yet cached into the gating cache,
        in passes of their own: the prompts length-sorted under the policy's budget, each beside a one-token
        stand-in item (so the items' batches then run no prompt rows, and no prompt row is padded to an
        unrelated prompt's length). Returns the prompts computed; does nothing when the cache is off or
        would not hold them all."""
        cache, policy = self.gating_cache, policy or self.policy
        if cache is None or not policy.dedup_prompts:
            return 0
        prompts = list(dict.fromkeys(e.prompt_ids or () for e in encoded))
        missing = [p for p in prompts if not cache.contains(prompt_key(p))]
        if not missing or len(missing) > cache.max_items:
            return 0
        for batch in policy.plan([len(p) for p in missing]):
            rows = [Encoded(self._stand_in, 0, missing[i], False) for i in batch]
            self.forward(self.collate(rows, policy))  # `forward` puts each prompt's gating into the cache
        return len(missing)

    # -- all of them -----------------------------------------------------------------------------------

    def score(
        self, items: Sequence[Item | dict], *, policy: BatchingPolicy | None = None, progress: bool = False
    ) -> list[ScoreResult]:
        """Score items (item models or dicts of the same shape); results come back in input order."""
        from tqdm import tqdm

        encoded = self.tokenize(items)
        self.prime_gating(encoded, policy)
        results: list[ScoreResult | None] = [None] * len(encoded)
        with tqdm(total=len(encoded), unit="item", desc="scoring", disable=not progress) as bar:
            for indices in self.plan(encoded, policy):
                batch = [encoded[i] for i in indices]
                for i, result in zip(
                    indices, self.results(batch, self.forward(self.collate(batch, policy))), strict=True
                ):
                    results[i] = result
                bar.update(len(batch))
        return results  # type: ignore[return-value]
