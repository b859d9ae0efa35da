"""Featurization: run the backbone once over every distinct input and cache pooled embeddings on disk.

Inputs go through the same `InputBuilder` as scoring, so heads are fitted on exactly the embeddings the
exported graph computes. What runs is a *sequence*: for encoders each distinct conversation and each distinct
prompt is one sequence (mean-pooled; a prompt's embedding is the gating input); for decoders each distinct
conversation is one sequence giving both its reward and gating embeddings.

The cache is a directory per (backbone, engine) holding safetensors shards of `keys` (sha256 of the token ids)
and `values` (embeddings). Every run plans the same length-sorted batches over all its sequences and skips
the batches already cached; shards are committed atomically at batch boundaries, so a killed run resumes where
it stopped and produces bit-identical embeddings to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from polyreward.models.runtime.batching import pad_sequences, plan_batches
from polyreward.models.runtime.builder import Encoded, InputBuilder, input_policy
from polyreward.models.runtime.files import atomic_replace
from polyreward.models.runtime.items import Item
from polyreward.models.runtime.session import create_session

log = logging.getLogger("polyreward.featurize")

Engine = Literal["onnx", "torch"]
EMBEDDER_FILE = "embedder.onnx"


@dataclass
class Features:
    """Per item: the reward embedding (whole conversation) and the gating embedding (prompt part)."""

    reward: np.ndarray  # [N, D] float32
    gating: np.ndarray  # [N, D] float32


@dataclass(frozen=True)
class _Sequence:
    key: bytes
    ids: tuple[int, ...]
    gating_pos: int


def backbone_fingerprint(backbone_dir: Path) -> str:
    """A cheap identity of a model directory: config, tokenizer and each weight file's size and edges."""
    h = hashlib.sha256()
    for path in sorted(backbone_dir.iterdir()):
        if path.suffix == ".json" or path.name.endswith((".safetensors", ".model", ".txt")):
            h.update(path.name.encode())
            size = path.stat().st_size
            h.update(str(size).encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    return h.hexdigest()


class FeatureCache:
    """Embeddings of sequences for one backbone and engine, stored as safetensors shards under `root`."""

    def __init__(
        self,
        root: str | os.PathLike,
        backbone_dir: str | os.PathLike,
        *,
        engine: Engine = "onnx",
        device: str = "cpu",
        max_length: int | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        from polyreward.models.torch.reward_model import detect_kind

        self.backbone_dir = Path(backbone_dir)
        self.engine, self.device = engine, device
        config = AutoConfig.from_pretrained(self.backbone_dir)
        tokenizer = AutoTokenizer.from_pretrained(self.backbone_dir)
        self.kind = detect_kind(config)
        self.hidden = int(config.hidden_size)
        self.policy = input_policy(config, tokenizer, self.kind, max_length=max_length)
        self.builder = InputBuilder(tokenizer, self.kind, self.policy)
        key = f"{backbone_fingerprint(self.backbone_dir)}:{engine}:{self.kind}"
        self.dir = Path(root) / f"{self.backbone_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache.json"
        if not info.exists():
            info.write_text(json.dumps({"backbone": str(self.backbone_dir.resolve()), "engine": engine}))
        self._keys: dict[bytes, int] = {}
        self._values: list[np.ndarray] = []
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            self._add(load_file(str(shard)))

    @property
    def width(self) -> int:
        return self.hidden if self.kind == "encoder" else 2 * self.hidden

    def _add(self, shard: dict[str, np.ndarray]) -> None:
        offset = sum(len(v) for v in self._values)
        for row, key in enumerate(shard["keys"]):
            self._keys.setdefault(key.tobytes(), offset + row)
        self._values.append(shard["values"])

    def _commit(self, keys: list[bytes], values: list[np.ndarray]) -> None:
        shard = {
            "keys": np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 32),
            "values": np.concatenate(values).astype(np.float32),
        }
        path = self.dir / f"shard-{len(self._values):05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(shard, str(tmp))
        atomic_replace(tmp, path)  # a killed run leaves whole shards or none
        self._add(shard)

    def sequences(self, encoded: Sequence[Encoded]) -> tuple[list[_Sequence], list[tuple[bytes, bytes]]]:
        """Distinct sequences to embed, and per item the keys of its (reward, gating) sequences."""
        distinct: dict[bytes, _Sequence] = {}
        per_item = []
        for e in encoded:
            if self.kind == "encoder":
                full = self._sequence(e.input_ids, 0)
                prompt = self._sequence(e.prompt_ids or e.input_ids[:1], 0)
                distinct.setdefault(full.key, full)
                distinct.setdefault(prompt.key, prompt)
                per_item.append((full.key, prompt.key))
            else:
                seq = self._sequence(e.input_ids, e.gating_pos)
                distinct.setdefault(seq.key, seq)
                per_item.append((seq.key, seq.key))
        return list(distinct.values()), per_item

    def _sequence(self, ids: tuple[int, ...], gating_pos: int) -> _Sequence:
        raw = np.asarray(ids, np.int64).tobytes() + np.int64(gating_pos).tobytes()
        return _Sequence(hashlib.sha256(raw).digest(), ids, gating_pos)

    def featurize(
        self,
        items: Sequence[Item],
        *,
        token_budget: int = 16384,
        max_items: int = 64,
        shard_items: int = 1024,
        progress: bool = True,
    ) -> Features:
        """Embeddings for `items` (input order), computing only the sequences not cached yet."""
        encoded = self.builder.build(items)
        seqs, per_item = self.sequences(encoded)
        batches = plan_batches([len(s.ids) for s in seqs], token_budget, max_items)
        todo = [b for b in batches if any(seqs[i].key not in self._keys for i in b)]
        missing = sum(len(b) for b in todo)
        log.info(
            "%d items -> %d distinct sequences; %d cached, %d to embed in %s",
            len(items), len(seqs), len(seqs) - missing, missing, self.dir,
        )  # fmt: skip
        if todo:
            self._run(seqs, todo, shard_items, progress)
        values = np.concatenate(self._values) if self._values else np.zeros((0, self.width), np.float32)
        reward_rows = [self._keys[r] for r, _ in per_item]
        gating_rows = [self._keys[g] for _, g in per_item]
        if self.kind == "encoder":
            return Features(values[reward_rows], values[gating_rows])
        d = self.hidden
        return Features(values[reward_rows, :d], values[gating_rows, d:])

    def _run(self, seqs: list[_Sequence], batches: list[list[int]], shard_items: int, progress: bool) -> None:
        run = self._onnx_runner() if self.engine == "onnx" else self._torch_runner()
        keys: list[bytes] = []
        values: list[np.ndarray] = []
        t0 = time.perf_counter()
        with tqdm(
            total=sum(len(b) for b in batches), unit="seq", desc="featurizing", disable=not progress
        ) as bar:
            for batch in batches:
                ids, mask, offsets = pad_sequences(
                    [seqs[i].ids for i in batch], self.builder.pad_id, self.policy.padding_side
                )
                feeds = {"input_ids": ids, "attention_mask": mask}
                if self.kind == "decoder":
                    feeds["gating_index"] = np.array(
                        [o + seqs[i].gating_pos for o, i in zip(offsets, batch, strict=True)], np.int64
                    )
                values.append(run(feeds))
                keys += [seqs[i].key for i in batch]
                bar.update(len(batch))
                if len(keys) >= shard_items:
                    self._commit(keys, values)
                    keys, values = [], []
        if keys:
            self._commit(keys, values)
        log.info("embedded %d sequences in %.1fs", sum(map(len, batches)), time.perf_counter() - t0)

    def _onnx_runner(self):
        from polyreward.models.torch.embedder import export_embedder

        graph = self.dir / EMBEDDER_FILE
        if not graph.exists():
            tmp = self.dir / f"tmp-{os.getpid()}.onnx"
            export_embedder(self.backbone_dir, tmp, max_length=self.policy.max_length)
            atomic_replace(tmp, graph)
        session = create_session(graph, self.device)
        outputs = [o.name for o in session.get_outputs()]
        names = [i.name for i in session.get_inputs()]
        return lambda feeds: np.concatenate(
            session.run(outputs, {n: feeds[n] for n in names}), axis=-1
        ).astype(np.float32)

    def _torch_runner(self):
        import torch

        from polyreward.models.torch.reward_model import build_embedder, load_backbone

        _, backbone, _ = load_backbone(self.backbone_dir)
        embedder = build_embedder(backbone, self.kind).to(self.device)

        @torch.inference_mode()
        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            args = [torch.from_numpy(feeds[n]).to(self.device) for n in embedder.input_names()]
            out = embedder(*args)
            out = out if isinstance(out, tuple) else (out,)
            return torch.cat(out, -1).float().cpu().numpy()

        return run
