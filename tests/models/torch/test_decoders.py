"""Every AutoModel decoder family end to end on tiny random configs: featurize → train → export → serve.

The graph's attention is polyreward's chunked loop (`polyreward.models.torch.attention`, 16-token chunks here);
the reference is transformers' eager attention.

Per family: `polyreward train objectives` featurizes the example ratings through the ONNX embedder and fits
heads, `polyreward export` builds the artifact, the graph is checked against PyTorch on mixed-length items
padded left and right (Mistral and Gemma2 with a 16-token sliding window, so most items are longer than the
window and a few shorter), and the real server must return the offline scorer's scores.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from support.tinymodels import DECODER_FAMILIES, SLIDING_WINDOW
from transformers import AutoConfig, AutoModel

from polyreward.models.runtime.artifact import HEADS_FILE
from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.items import ChatItem, Item, PromptItem, TextItem, sample_items
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.heads import load_heads
from polyreward.models.torch.reward_model import build_reward_model, embed_torch, score_torch
from polyreward.training.featurize import FeatureCache

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Query tokens per step of the exported attention loop: shorter than most test conversations and equal to the
# sliding window, so items span several chunks and windows cross chunk boundaries.
CHUNK = 16

# Attention options of the tiny configs and the value that switches each off (checked to matter below).
SWITCHES = {
    "mistral": {"sliding_window": None},
    "gemma2": {"sliding_window": 10**6, "attn_logit_softcapping": None},
}


def parity_items() -> list[Item]:
    """Mixed lengths and formats: raw text of a few tokens (shorter than the sliding window), short one-turn
    chats, and packaged conversations (multi-turn, with system turns, raw templated text) up to a few hundred
    tokens."""
    short = [
        TextItem(text="Yes."),
        TextItem(text="The quick brown fox."),
        PromptItem(prompt="Hi", response="Yo."),
        PromptItem(prompt="What is the capital of France?", response="Paris, on the Seine."),
    ]
    sample = sorted(sample_items(), key=lambda it: len(it.model_dump_json()))
    with_system = next(it for it in sample if isinstance(it, ChatItem) and it.messages[0].role == "system")
    return [*short, *sample[:6], *sample[12:15], with_system]


@pytest.fixture(scope="module")
def pipelines(
    tmp_path_factory, tiny_decoder, cli, repo
) -> dict[str, tuple[Path, Path, dict] | AssertionError]:
    """Per family: a tiny backbone, heads trained on it through the CLI, and their exported artifact.

    The CLI pipelines run two at a time (each is mostly interpreter and import start-up); a failed one is
    reported by its own family's test.
    """
    root = tmp_path_factory.mktemp("decoders")
    backbones = {family: tiny_decoder(root / family / "backbone", family) for family in DECODER_FAMILIES}

    def train_and_export(family: str) -> tuple[Path, Path, dict]:
        out, backbone = root / family, backbones[family]
        config = out / "train.yaml"
        config.write_text(
            f"backbone: {backbone}\n"
            "stage1: {verbosity: false}\n"
            "datasets:\n"
            f"  - {{name: examples, path: {repo / 'examples/ratings.jsonl'}, kind: ratings, holdout: 0,"
            " prompt: prompt, response: response, ratings: ratings}\n"
        )
        train = cli("train", "objectives", "--config", config, "--out", out, "--quiet")
        cli(
            "export", "--heads", out / "stage1.safetensors", "--out", out / "artifact", "--backbone", backbone,
            "--precision", "fp32", "--attention-chunk", CHUNK,
        )  # fmt: skip
        return backbone, out / "artifact", json.loads(train.stdout)

    def attempt(family: str) -> tuple[Path, Path, dict] | AssertionError:
        try:
            return train_and_export(family)
        except AssertionError as e:  # reported by that family's test only
            return e

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(DECODER_FAMILIES, pool.map(attempt, DECODER_FAMILIES), strict=True))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_family_end_to_end(family, pipelines, serve):
    if isinstance(pipelines[family], AssertionError):
        raise pipelines[family]
    backbone, artifact, stage1 = pipelines[family]
    assert stage1["helpfulness"]["n"] == 84 and stage1["harmlessness"]["n"] > 0
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    assert scorer.manifest.backbone.model_type == family and scorer.manifest.backbone.kind == "decoder"
    assert scorer.manifest.input.padding_side == "left" and scorer.manifest.input.template == "chat"
    assert scorer.manifest.provenance["attention_chunk"] == CHUNK
    graph = onnx.load(str(artifact / scorer.manifest.graphs["fp32"].file))
    assert sum(n.op_type == "Loop" for n in graph.graph.node) == 2  # one attention loop per layer
    # The reference is transformers' own eager attention (not polyreward's attention function).
    config = AutoConfig.from_pretrained(backbone)
    eager = AutoModel.from_pretrained(backbone, attn_implementation="eager").eval()
    model = build_reward_model(eager, load_heads(artifact / HEADS_FILE), "decoder")
    pad_id = scorer.builder.pad_id

    items = parity_items()
    encoded = scorer.tokenize(items)
    lengths = sorted(e.tokens for e in encoded)
    assert lengths[0] < SLIDING_WINDOW and lengths[-1] > 10 * SLIDING_WINDOW and len(set(lengths)) > 8
    for option in SWITCHES.get(family, {}):
        assert getattr(config, option) is not None, option

    # Featurization ran the ONNX embedder: the cached embeddings are PyTorch's, item by item, unpadded.
    cache = FeatureCache(artifact.parent / "features", backbone)
    feats = cache.featurize(items[:8], progress=False)
    for i, e in enumerate(encoded[:8]):
        reward_emb, gating_emb = embed_torch(model, [e], pad_id=pad_id)
        assert np.abs(feats.reward[i] - reward_emb[0]).max() <= 1e-4
        assert np.abs(feats.gating[i] - gating_emb[0]).max() <= 1e-4

    # The exported graph against PyTorch scoring each item alone, on one padded batch per side.
    alone = [score_torch(model, [e], pad_id=pad_id) for e in encoded]
    want = {k: np.concatenate([a[k] for a in alone]) for k in alone[0]}
    for side in ("left", "right"):
        arrays = collate(encoded, kind="decoder", pad_id=pad_id, padding_side=side)
        got = scorer.session.run(scorer.output_names, {n: arrays[n] for n in scorer.input_names})
        for name, g in zip(scorer.output_names, got, strict=True):
            diff = np.abs(g - want[name]).max()
            assert diff <= 1e-4, f"{family} {side}-padded {name}: max abs diff {diff:.3g}"
    # The reference really depends on the family's attention options, so the graph follows them too.
    for option, off in SWITCHES.get(family, {}).items():
        plain = AutoModel.from_pretrained(backbone, attn_implementation="eager", **{option: off}).eval()
        plain_model = build_reward_model(plain, model.heads, "decoder")
        changed = np.abs(score_torch(plain_model, encoded, pad_id=pad_id)["rewards"] - want["rewards"]).max()
        assert changed > 1e-2, f"{family}: {option}={off} changes rewards by only {changed:.2g}"
    offline = scorer.score(items)
    assert np.abs(np.array([r.score for r in offline]) - want["score"]).max() <= 1e-4

    # The real server returns the offline scorer's results.
    with serve(artifact) as (url, _):
        payload = [it.model_dump(exclude_none=True) for it in items]
        r = httpx.post(f"{url}/v1/score", json={"items": payload, "return": ["gating"]}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(items)
    for res, off in zip(results, offline, strict=True):
        assert res["tokens"] == off.tokens
        assert abs(res["score"] - off.score) <= 1e-5
        assert np.abs(np.array(res["rewards"]) - off.rewards).max() <= 1e-5
        assert np.abs(np.array(res["gating"]) - off.gating).max() <= 1e-5
