"""Compare every ONNX graph in an artifact with the PyTorch model it was exported from, on real text.

The reference is PyTorch scoring each item alone (no padding); the ONNX side is `Scorer` with its normal
length-sorted batching, so padding, batching and export errors all show up as differences.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from polyreward.models.runtime.artifact import HEADS_FILE, ArtifactError, load_manifest, verify_files
from polyreward.models.runtime.builder import InputRejected
from polyreward.models.runtime.items import Item, sample_items
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.heads import load_heads
from polyreward.models.torch.reward_model import build_reward_model, load_backbone, score_torch

# Release gates per variant: (max abs diff allowed, minimum score Spearman). fp32 must be exact; the reduced
# precisions must keep the ranking (per-tensor int8 drops to ~0.94 and is not shipped).
GATES = {"fp32": (1e-4, 0.999), "int8": (None, 0.98), "int8-dynamic": (None, 0.98), "fp16": (5e-2, 0.99)}


def _accepted(scorer: Scorer, item: Item) -> bool:
    """False for an item this model refuses (e.g. raw text without ArmoRM's assistant header)."""
    try:
        scorer.tokenize([item])
    except InputRejected:
        return False
    return True


def check_parity(
    artifact: str | os.PathLike,
    *,
    items: list[Item] | None = None,
    backbone: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict[str, dict]:
    """{variant: {max_abs_diff, spearman_score, n, pass}} or {variant: {skipped: reason}} per graph."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    verify_files(artifact, manifest, [HEADS_FILE])
    backbone_dir = Path(backbone or manifest.backbone.id)
    if not backbone_dir.is_dir():
        raise ArtifactError(
            f"{artifact / 'manifest.json'}: backbone {backbone_dir} is not here; pass --backbone DIR"
        )
    items = items or sample_items()
    _, torch_backbone, _ = load_backbone(backbone_dir)
    model = build_reward_model(torch_backbone, load_heads(artifact / HEADS_FILE), manifest.backbone.kind)

    report: dict[str, dict] = {}
    reference: dict[str, np.ndarray] | None = None
    for precision in manifest.graphs:
        try:
            scorer = Scorer(artifact, precision=precision, device=device)  # type: ignore[arg-type]
            items = [it for it in items if _accepted(scorer, it)]
            results = scorer.score(items)
        except ArtifactError:
            raise
        except Exception as e:  # e.g. an fp16 graph has no CPU kernels: report, do not fail the others
            report[precision] = {"skipped": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        if reference is None:
            encoded = scorer.tokenize(items)
            alone = [score_torch(model, [e], pad_id=scorer.builder.pad_id) for e in encoded]
            reference = {k: np.concatenate([a[k] for a in alone]) for k in alone[0]}
        got = {k: np.array([getattr(r, k) for r in results]) for k in reference}
        diff = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
        rho = float(spearmanr(got["score"], reference["score"]).statistic)
        max_diff, min_rho = GATES[precision]
        report[precision] = {
            "max_abs_diff": diff,
            "spearman_score": rho,
            "n": len(items),
            "pass": (max_diff is None or diff <= max_diff) and rho >= min_rho,
        }
    return report
