"""`polyreward import-hf` on tiny random `*ForSequenceClassification` checkpoints of every supported family,
against transformers' own forward (its default attention) on the same token ids, one item at a time; and the
one-line errors a bad checkpoint gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tinymodels import tiny_classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from polyreward.models.runtime.items import ChatItem, PromptItem
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.armorm import CheckpointError
from polyreward.models.torch.export import ExportOptions
from polyreward.models.torch.hf_import import FAMILIES, import_hf

pytestmark = pytest.mark.slow

LABELS = ["helpfulness", "correctness", "coherence"]


def conversations(mixed_items) -> list[ChatItem]:
    """The first 16 mixed items (a few tokens to thousands) as chats, plus a multi-turn one."""
    chats = [
        ChatItem(
            messages=[{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.response}]
        )
        if isinstance(it, PromptItem)
        else it
        for it in mixed_items[:16]
        if isinstance(it, PromptItem | ChatItem)
    ]
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name the capital of France."},
        {"role": "assistant", "content": "Paris."},
    ]
    return [*chats, ChatItem(messages=turns)]


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_rewards_are_transformers_logits(family, tmp_path, mixed_items):
    labels = LABELS if family == "gemma2" else None
    checkpoint = tiny_classifier(tmp_path / "checkpoint", family, labels)
    manifest = import_hf(
        checkpoint, tmp_path / "artifact", ExportOptions(precisions=("fp32",), max_length=1024)
    )
    assert manifest.objective_names == (labels or ["reward"])
    assert manifest.provenance["imported_from"] == "hf-sequence-classification"

    scorer = Scorer(tmp_path / "artifact", precision="fp32", device="cpu")
    items = [it for it in conversations(mixed_items) if not scorer.tokenize([it])[0].truncated]
    assert len(items) >= 12
    results = scorer.score(items)  # batched, left-padded
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    want, got = [], []
    for item, encoded, result in zip(items, scorer.tokenize(items), results, strict=True):
        messages = [m.model_dump() for m in item.messages]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert list(encoded.input_ids) == ids, "not the checkpoint's own chat template"
        with torch.no_grad():
            want.append(reference(input_ids=torch.tensor([ids])).logits[0].numpy())
        got.append(result.rewards)
    want, got = np.array(want), np.array(got)
    assert want.std() > 1e-2  # the rewards really differ between items
    assert np.abs(got - want).max() <= 1e-4
    scores = np.array([r.score for r in results])
    assert np.abs(scores - want.mean(-1)).max() <= 1e-4  # the score: the labels' mean (one label: the logit)


def test_a_bad_checkpoint_fails_naming_the_file_and_what_is_missing(tmp_path, cli):
    checkpoint = tiny_classifier(tmp_path / "checkpoint", "qwen2")
    out = tmp_path / "artifact"

    def refused(match: str, objectives=None) -> None:
        with pytest.raises(CheckpointError, match=match):
            import_hf(checkpoint, out, ExportOptions(precisions=("fp32",)), objectives)

    refused("--objective: 2 name", ["a", "b"])
    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "score.weight"}, weights)
    refused(r"tensor 'score.weight' \(the classification head\) not found")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k}, weights)
    refused(r"backbone tensors missing from its safetensors: \['layers.1.mlp")
    save_file({**tensors, "score.weight": tensors["score.weight"][:, :32].contiguous()}, weights)
    refused(r"model.safetensors: score.weight has shape \[1, 32\], expected \[1, 64\]")

    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    refused(r"config.json: architectures \['Qwen2ForCausalLM'\] has no \*ForSequenceClassification")
    # The real command: one line on stderr naming the file, exit status 2, nothing written.
    result = cli("import-hf", checkpoint, "--out", out, check=False)
    assert result.returncode == 2 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "ForSequenceClassification" in lines[0], lines
    (checkpoint / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"], "model_type": "gpt2"})
    )
    refused(r"model_type 'gpt2' is not supported; import-hf reads llama, mistral, qwen2, qwen3, gemma2")
    (checkpoint / "config.json").unlink()
    refused("no config.json")
