"""`Scorer`: score conversations with an artifact's ONNX graph in length-sorted batches. No torch.

The scorer is the engine behind `polyreward score`, the service and dataset rescoring. Its three steps are
public so a server can run them on different threads: `encode` (tokenize), `run` (one padded batch through
ONNX Runtime), and `score`, which plans batches and returns results in input order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from models.artifact import TOKENIZER_DIR, load_manifest, verify_graph
from models.batching import plan_batches
from models.errors import PolyrewardError
from models.inputs import Encoded, InputBuilder, Item, collate, parse_item
from models.manifest import PRECISIONS, Manifest, Precision

log = logging.getLogger("polyreward.scorer")

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class ScoreResult:
    score: float
    rewards: list[float]  # one per objective, in `Scorer.objectives` order
    gating: list[float]
    tokens: int
    truncated: bool
    uncertainty: list[float] | None = None  # posterior std per objective, when the heads carry it

    @classmethod
    def from_outputs(cls, encoded: Encoded, row: dict[str, np.ndarray]) -> ScoreResult:
        """One item's result from its row of the graph outputs."""
        uncertainty = row.get("uncertainty")
        return cls(
            score=float(row["score"]),
            rewards=row["rewards"].tolist(),
            gating=row["gating"].tolist(),
            tokens=encoded.tokens,
            truncated=encoded.truncated,
            uncertainty=None if uncertainty is None else uncertainty.tolist(),
        )


DEFAULT_TOKEN_BUDGET = {"cpu": 512, "gpu": 16384}


def resolve_device(device: str) -> str:
    """ "auto" → "cuda" when onnxruntime-gpu sees a GPU, else "cpu"; anything else is checked and kept."""
    import onnxruntime as ort

    if device not in ("auto", *_PROVIDERS):
        raise PolyrewardError(f"device: {device!r} is not one of auto, {', '.join(_PROVIDERS)}")
    if device != "auto":
        return device
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


class Scorer:
    """Loads an artifact (checking its files' sha256) and scores items with ONNX Runtime.

    precision: which graph to run; "auto" picks fp16 on CUDA when the artifact has it (or has nothing else),
    else fp32.
    device: "auto" uses CUDA when onnxruntime-gpu sees a GPU, else the CPU. A GPU provider that was asked for
    but is not the one the session really runs on is reported loudly (`fallback` is then True).
    token_budget / max_batch_items: a batch holds at most this many padded tokens / items. The default budget
    is 512 tokens on a CPU (measured with MiniLM on 2 cores: one 256-token sequence already keeps the cores
    busy, so bigger batches only add padding; 512 gave 1.6-2x the items/s of 16384) and 16384 on a GPU.
    `polyreward tune` measures the best budget for an artifact on this machine.
    threads / spin: ONNX Runtime's intra-op threads (default: one per core) and whether they spin while
    waiting for work (default: ORT's, on). Spinning is faster alone and slower beside other busy threads.
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        precision: Precision | Literal["auto"] = "auto",
        device: Device = "auto",
        token_budget: int | None = None,
        max_batch_items: int = 64,
        threads: int | None = None,
        spin: bool | None = None,
    ):
        import onnxruntime as ort
        from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: that imports torch when present

        if precision not in ("auto", *PRECISIONS):
            raise PolyrewardError(f"precision: {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
        self.artifact = Path(artifact)
        available = ort.get_available_providers()
        device = resolve_device(device)
        self.manifest: Manifest = load_manifest(self.artifact)
        if precision == "auto":
            graphs = self.manifest.graphs
            precision = "fp16" if "fp16" in graphs and (device != "cpu" or "fp32" not in graphs) else "fp32"
        verify_graph(self.artifact, self.manifest, precision)
        self.precision: Precision = precision
        self.device = device
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.artifact / TOKENIZER_DIR)
        self.builder = InputBuilder(tokenizer, self.manifest.backbone.kind, self.manifest.input)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET["cpu" if device == "cpu" else "gpu"]
        self.max_batch_items = max_batch_items
        self.dedup_prompts = True  # items of one batch that share a prompt share its gating pass

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        requested = _PROVIDERS[device]
        usable = [p for p in requested if p in available]
        graph = self.artifact / self.manifest.graphs[precision].file
        self.session = ort.InferenceSession(str(graph), options, providers=usable)
        self.providers: list[str] = self.session.get_providers()
        self.fallback = self.providers[0] != requested[0]
        if self.fallback:
            log.warning(
                "!!! %s was requested but the session runs on %s (available here: %s). Scoring works but is "
                "slow; install onnxruntime-gpu with a matching CUDA/cuDNN to use the GPU. !!!",
                requested[0], self.providers[0], ", ".join(available),
            )  # fmt: skip
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def objectives(self) -> list[str]:
        return self.manifest.objective_names

    def encode(self, items: Sequence[Item | dict]) -> list[Encoded]:
        return self.builder.encode([parse_item(it, f"items[{i}]") for i, it in enumerate(items)])

    def plan(self, encoded: Sequence[Encoded]) -> list[list[int]]:
        return plan_batches([e.tokens for e in encoded], self.token_budget, self.max_batch_items)

    def collate(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Pad one batch into the graph's inputs (a server does this while the previous batch runs)."""
        arrays = collate(
            batch,
            kind=self.builder.kind,
            pad_id=self.builder.pad_id,
            padding_side=self.manifest.input.padding_side,
            dedup_prompts=self.dedup_prompts,
        )
        return {name: arrays[name] for name in self.input_names}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run collated inputs through the graph: {rewards [N,K], gating [N,K], score [N], uncertainty? [N,K]}."""
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def run(self, batch: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """One padded batch through the graph."""
        return self.infer(self.collate(batch))

    def score(self, items: Sequence[Item | dict], *, progress: bool = False) -> list[ScoreResult]:
        """Score items (Item objects or dicts of the same shape); results come back in input order."""
        encoded = self.encode(items)
        results: list[ScoreResult | None] = [None] * len(encoded)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(encoded), unit="item", desc="scoring")
        for batch in self.plan(encoded):
            out = self.run([encoded[i] for i in batch])
            for row, i in enumerate(batch):
                results[i] = ScoreResult.from_outputs(encoded[i], {k: v[row] for k, v in out.items()})
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]
