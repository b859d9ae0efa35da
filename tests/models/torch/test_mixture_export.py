"""Mixture heads in the one ONNX graph: group outputs against PyTorch, the manifest, the prompt cache."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoConfig

from polyreward.models.runtime.artifact import HEADS_FILE, load_manifest
from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.export import ExportOptions, export_artifact
from polyreward.models.torch.heads import GROUP_OUTPUTS, load_heads
from polyreward.models.torch.reward_model import build_reward_model, load_backbone, score_torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixture_artifacts(tmp_path_factory, backbone_dirs, random_heads):
    built = {}
    for family, components in [("llama", "fixed"), ("llama", "gated"), ("minilm", "fixed")]:
        root = tmp_path_factory.mktemp(f"mixture-{family}-{components}")
        hidden = AutoConfig.from_pretrained(backbone_dirs[family]).hidden_size
        heads = random_heads(
            root / "heads.safetensors", hidden, kind="mixture", seed=5, components=components
        )
        options = ExportOptions(precisions=["fp32"], max_length=256, name=f"mixture-{components}")
        export_artifact(backbone_dirs[family], heads, root / "artifact", options)
        built[family, components] = root / "artifact"
    return built


@pytest.mark.parametrize("family,components", [("llama", "fixed"), ("llama", "gated"), ("minilm", "fixed")])
def test_mixture_graph_matches_pytorch(family, components, mixture_artifacts, backbone_dirs, mixed_items):
    artifact = mixture_artifacts[family, components]
    manifest = load_manifest(artifact)
    assert manifest.schema_version == 4  # version 3 for every artifact without groups (tests/models/runtime)
    head = manifest.head
    assert (head.kind, head.groups, head.routing) == ("mixture", ["a", "b"], "latent")
    scorer = Scorer(artifact, precision="fp32", device="cpu", gating_cache=0)
    assert set(GROUP_OUTPUTS) <= set(scorer.output_names)
    _, backbone, _ = load_backbone(backbone_dirs[family])
    model = build_reward_model(backbone, load_heads(artifact / HEADS_FILE), manifest.backbone.kind)
    encoded = scorer.tokenize(mixed_items[:16])
    rows = [score_torch(model, [e], pad_id=scorer.builder.pad_id) for e in encoded]
    want = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    arrays = collate(encoded, kind=scorer.builder.kind, pad_id=scorer.builder.pad_id, padding_side="right")
    got = dict(zip(scorer.output_names, scorer.session.run(scorer.output_names, arrays), strict=True))
    for name in ["rewards", "gating", "score", *GROUP_OUTPUTS]:
        diff = np.abs(got[name] - want[name]).max()
        assert diff <= 1e-4, f"{family} {components} {name}: max abs diff {diff:.3g}"
    # The formulas hold in the graph: π sums to 1, the score is the router's mixture of the group scores.
    probs, scores, gating = got["group_probs"], got["group_scores"], got["group_gating"]
    assert np.allclose(probs.sum(-1), 1, atol=1e-5)
    debiased = got["rewards"] @ np.array(manifest.transform, np.float32)
    assert np.allclose(scores, (gating * debiased[:, None, :]).sum(-1), atol=1e-4)
    assert np.allclose(got["score"], (probs * scores).sum(-1), atol=1e-4)
    assert np.allclose(got["gating"], (probs[:, :, None] * gating).sum(1), atol=1e-5)
    if components == "gated":  # each group's weighting depends on the prompt
        assert np.abs(gating - gating[:1]).max() > 1e-3


def test_prompt_cache_keeps_the_group_outputs(mixture_artifacts, mixed_items):
    """Items whose prompt is cached get the same router probabilities and group scores as a full pass."""
    artifact = mixture_artifacts["minilm", "fixed"]
    plain = Scorer(artifact, precision="fp32", device="cpu", gating_cache=0).score(mixed_items)
    cached_scorer = Scorer(artifact, precision="fp32", device="cpu")
    assert cached_scorer.gating_cache is not None
    cached_scorer.score(mixed_items)
    again = cached_scorer.score(mixed_items)
    assert cached_scorer.gating_cache.hits > 0
    for a, b in zip(plain, again, strict=True):
        assert b.group_probs is not None and b.group_scores is not None
        assert np.allclose(a.group_probs, b.group_probs, atol=1e-5)
        assert np.allclose(a.group_scores, b.group_scores, atol=1e-4)
        assert abs(a.score - b.score) <= 1e-4
