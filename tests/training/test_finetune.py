"""Multi-head fine-tuning: it learns, merges, and exports through the same path as stage-1 heads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from polyreward.models.runtime.artifact import load_manifest
from polyreward.models.runtime.items import Message
from polyreward.models.runtime.objectives import Objective
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.export import ExportOptions, export_artifact
from polyreward.models.torch.heads import load_heads
from polyreward.models.torch.reward_model import build_reward_model, detect_kind, load_backbone, score_torch
from polyreward.training.data import Examples, PairExample, RatingExample
from polyreward.training.finetune import (
    FinetuneConfig,
    FinetuneError,
    dataset_loss,
    finetune,
    lora_target_modules,
    prepare,
)

WORDS = ["the", "fox", "river", "stone", "answer", "city", "bread", "light", "garden", "music"]
OBJECTIVES = [
    Objective(name="length", scale=(0, 20), description="response word count"),
    Objective(name="polite", description="says please"),
]


def synthetic_examples(n_ratings: int = 40, n_pairs: int = 30, seed: int = 0) -> Examples:
    """`length` rates the response's word count; `polite` pairs prefer the reply that says please.

    Also holds what training must skip: a tie, pairs with no or an unknown objective, and test-split rows.
    """
    rng = random.Random(seed)

    def prompt(i: int) -> list[Message]:
        return [Message(role="user", content=f"Tell me about the {WORDS[i % len(WORDS)]}.")]

    def reply(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    ratings = []
    for i in range(n_ratings):
        n = rng.randint(1, 20)
        ratings.append(RatingExample(f"r{i}", "synthetic", prompt(i), reply(n), {"length": float(n)}))
    pairs = []
    for i in range(n_pairs):
        body = reply(rng.randint(2, 6))
        pairs.append(PairExample(f"p{i}", "synthetic", prompt(i), f"please {body}", body, objective="polite"))
    skipped = [
        PairExample("tie", "synthetic", prompt(0), "please a", "b", objective="polite", tie=True),
        PairExample("unknown", "synthetic", prompt(1), "please a", "b", objective="safety"),
        PairExample("none", "synthetic", prompt(2), "please a", "b"),
        PairExample("held-out", "synthetic", prompt(3), "please a", "b", objective="polite", split="test"),
    ]
    held_out = RatingExample("r-test", "synthetic", prompt(0), "a b", {"length": 2.0}, split="test")
    return Examples(ratings=[*ratings, held_out], pairs=[*pairs, *skipped])


def tensor(path, name: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def assert_onnx_matches_torch(artifact, backbone_dir, heads_path, items) -> float:
    """Score `items` with the artifact's fp32 graph and with the fine-tuned PyTorch model; return max diff."""
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    config, backbone, _ = load_backbone(backbone_dir)
    model = build_reward_model(backbone, load_heads(heads_path), detect_kind(config))
    encoded = scorer.tokenize(items)
    want = score_torch(
        model, encoded, pad_id=scorer.builder.pad_id, padding_side=scorer.manifest.input.padding_side
    )
    got = scorer.forward(scorer.collate(encoded))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in ("rewards", "score"))
    assert diff <= 1e-4, f"ONNX differs from the fine-tuned PyTorch model by {diff:.3g}"
    return diff


def test_lora_finetune_lowers_training_loss_and_exports_with_parity(backbone_dirs, tmp_path):
    examples = synthetic_examples()
    cfg = FinetuneConfig(lr=3e-3, head_lr=1e-2, batch_size=16, max_steps=40)
    # Each term of the objective on its own: the masked rating MSE, then the Bradley–Terry pair loss.
    terms = [cfg.model_copy(update={"pair_weight": 0.0}), cfg.model_copy(update={"rating_weight": 0.0})]
    start, builder, data = prepare(backbone_dirs["llama"], examples, OBJECTIVES, cfg)
    before = [dataset_loss(start, builder, data, c) for c in terms]

    backbone_dir, heads_path, metrics = finetune(
        backbone_dirs["llama"], examples, OBJECTIVES, tmp_path / "ft", cfg, progress=False
    )
    assert (metrics["ratings"], metrics["pairs"], metrics["steps"]) == (40, 30, 40)
    assert metrics["lora"] and 0 < metrics["trainable_params"] < metrics["total_params"] / 10

    # The loss of the saved (merged) model on the whole training set, not a batch average.
    config, backbone, _ = load_backbone(backbone_dir)
    trained = build_reward_model(backbone, load_heads(heads_path), detect_kind(config))
    after = [dataset_loss(trained, builder, data, c) for c in terms]
    # Mean initialisation: the MSE starts at the label variance and Bradley–Terry at log 2.
    assert before[1] == pytest.approx(np.log(2), abs=1e-6)
    assert after[0] < 0.5 * before[0] and after[1] < 0.1 * before[1], f"loss {before} -> {after}"
    # The adapters were merged into the attention weights peft targets by default for llama.
    assert lora_target_modules(backbone) == ["q_proj", "v_proj"]
    name = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tensor(backbone_dir, name), tensor(backbone_dirs["llama"], name))
    name = "layers.0.self_attn.k_proj.weight"
    assert torch.equal(tensor(backbone_dir, name), tensor(backbone_dirs["llama"], name))

    artifact = tmp_path / "artifact"
    manifest = export_artifact(
        backbone_dir, heads_path, artifact, ExportOptions(["fp32"], max_length=metrics["max_length"])
    )
    assert manifest.objective_names == ["length", "polite"]
    assert manifest.head.kind == "fixed"
    items = [e.item for e in examples.ratings[:3]] + list(examples.pairs[0].items)
    assert_onnx_matches_torch(artifact, backbone_dir, heads_path, items)


@pytest.mark.slow
def test_full_finetune_changes_minilm_weights_and_exports(backbone_dirs, tmp_path):
    examples = synthetic_examples(n_ratings=8, n_pairs=4)
    cfg = FinetuneConfig(lora=False, max_steps=3, batch_size=4, lr=1e-4)
    backbone_dir, heads_path, metrics = finetune(
        backbone_dirs["minilm"], examples, OBJECTIVES, tmp_path / "ft", cfg, progress=False
    )
    assert metrics["steps"] == 3 and not metrics["lora"]
    assert metrics["trainable_params"] == metrics["total_params"]
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(tensor(backbone_dir, name), tensor(backbone_dirs["minilm"], name))

    artifact = tmp_path / "artifact"
    export_artifact(backbone_dir, heads_path, artifact, ExportOptions(["fp32"]))
    assert load_manifest(artifact).backbone.kind == "encoder"
    assert_onnx_matches_torch(artifact, backbone_dir, heads_path, [e.item for e in examples.ratings[:3]])


def test_same_seed_same_model_other_seed_other_model(backbone_dirs, tmp_path):
    examples = synthetic_examples(n_ratings=12, n_pairs=6)

    def run(seed: int, out: str) -> dict[str, torch.Tensor]:
        cfg = FinetuneConfig(lr=1e-3, max_steps=4, batch_size=8, seed=seed, lora_dropout=0.1)
        _, heads_path, _ = finetune(
            backbone_dirs["qwen2"], examples, OBJECTIVES, tmp_path / out, cfg, progress=False
        )
        return load_heads(heads_path).state_dict()

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["regression.weight"], c["regression.weight"])


def test_lora_targets_fall_back_to_attention_linears_for_unknown_architectures(backbone_dirs, monkeypatch):
    from peft.utils import constants

    _, backbone, _ = load_backbone(backbone_dirs["minilm"])
    assert lora_target_modules(backbone) == ["query", "value"]
    assert lora_target_modules(backbone, ["key"]) == ["key"]
    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "bert")
    targets = lora_target_modules(backbone)
    assert len(targets) == 6 * 4  # query, key, value and the attention output projection of 6 layers
    assert {t.split(".", 3)[-1] for t in targets} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("lora_r", 0), ("batch_size", 1), ("lr", 0.0), ("max_steps", 0), ("target_modules", [])],
)
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        FinetuneConfig(**{field: value})
    assert field in str(err.value)
    with pytest.raises(ValidationError, match="lora_rank"):
        FinetuneConfig(lora_rank=8)  # a misspelt field is refused, not ignored


def test_bad_objective_scale_and_no_usable_examples_are_named_errors(backbone_dirs, tmp_path):
    examples = synthetic_examples(n_ratings=4, n_pairs=2)
    with pytest.raises(ValueError, match=r"scale.*lo < hi"):
        Objective(name="length", scale=(5, 5))
    with pytest.raises(FinetuneError, match="nothing to train on"):
        finetune(
            backbone_dirs["llama"],
            examples,
            [Objective(name="honesty")],
            tmp_path,
            FinetuneConfig(),
            progress=False,
        )
