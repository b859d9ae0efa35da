"""The backbone and pooling alone (no heads) as one fp32 graph, for featurization through ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

from polyreward.models.runtime.builder import input_policy
from polyreward.models.runtime.manifest import InputPolicy
from polyreward.models.torch.ort_passes import fuse
from polyreward.models.torch.reward_model import build_embedder, detect_kind, load_backbone
from polyreward.models.torch.trace import export_onnx, store_transposed, trace_example
from polyreward.models.torch.verify import check_against_torch, run_torch


def export_embedder(
    backbone_dir: str | os.PathLike, path: str | os.PathLike, *, max_length: int | None = None
) -> InputPolicy:
    """Export the embedder of a backbone directory to `path`; returns the input policy used.

    Encoders: (input_ids, attention_mask) -> reward_embedding [N, D] (a prompt is just another sequence);
    decoders: (input_ids, attention_mask, gating_index) -> reward_embedding, gating_embedding. The graph is
    fused like an artifact's, so embeddings match what artifacts compute.
    """
    config, backbone, tokenizer = load_backbone(backbone_dir)
    kind = detect_kind(config)
    embedder = build_embedder(backbone, kind)
    policy = input_policy(config, tokenizer, kind, max_length=max_length)
    example = trace_example(tokenizer, kind, policy)
    path = Path(path)
    if kind == "decoder":
        store_transposed(embedder.model.backbone)
    want = run_torch(embedder, example, embedder.input_names())
    export_onnx(embedder, example, embedder.input_names(), path, "torchscript")
    if kind == "encoder":
        fuse(path, config)
    check_against_torch(want, example, path)
    return policy
