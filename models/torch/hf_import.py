"""Import a Hugging Face `*ForSequenceClassification` reward model as an artifact (`polyreward import-hf`).

Most published reward models (Skywork-Reward-V2, the Qwen- and Llama-based RMs of RewardBench) are a decoder
with a linear `score` layer on the hidden state of the last real token: `logits = score(h[last])`, one logit
per label. This module reads such a checkpoint without running any of its code (safetensors only, no
`trust_remote_code`) and re-expresses it with our decoder wrapper and fixed-weight heads:

    rewards = h[last] @ score.weight^T (+ score.bias)           [N, L]   one objective per label
    score   = sum_l w_l * rewards_l,  w_l = 1 / L                [N]      (one label: the logit itself)

which is exactly transformers' forward (the logits) for each item. Objectives are named by the user, else by
`id2label` (the generic `LABEL_0` of a one-label model becomes `reward`). Conversations are rendered with the
checkpoint's own chat template, saved with its tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from polyreward.models.runtime.builder import input_policy
from polyreward.models.runtime.manifest import Manifest
from polyreward.models.runtime.objectives import Objective
from polyreward.models.torch.armorm import CheckpointError, tensor_files
from polyreward.models.torch.export import ExportOptions, write_artifact
from polyreward.models.torch.heads import HeadsConfig, RewardHeads

log = logging.getLogger("polyreward.hf_import")

# Decoder families whose `*ForSequenceClassification` is the backbone plus `score` (no bias) on the last real
# token, each with a parity test against transformers (tests/models/torch/test_hf_import.py).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
HEAD = "score"
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def read_config(checkpoint: Path):
    """The checkpoint's transformers config, refused unless it is a supported sequence classifier."""
    from transformers import AutoConfig

    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json — expected a Hugging Face checkpoint directory")
    raw = json.loads(path.read_text())
    architectures = raw.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        hint = " (an ArmoRM checkpoint: use import-armorm)" if raw.get("num_objectives") else ""
        raise CheckpointError(
            f"{path}: architectures {architectures} has no *ForSequenceClassification model{hint}"
        )
    if raw.get("model_type") not in FAMILIES:
        raise CheckpointError(
            f"{path}: model_type {raw.get('model_type')!r} is not supported; import-hf reads "
            f"{', '.join(FAMILIES)}"
        )
    return AutoConfig.from_pretrained(checkpoint)


def objective_names(config, names: Sequence[str] | None) -> list[str]:
    """One name per label: the user's, else `id2label`'s (a one-label model's generic LABEL_0 → reward)."""
    labels = int(config.num_labels)
    if names:
        if len(names) != labels:
            raise CheckpointError(
                f"--objective: {len(names)} name(s) given, the checkpoint has {labels} label(s) (config.json "
                "num_labels / id2label)"
            )
        return list(names)
    given = [str(config.id2label[i]) for i in range(labels)]
    if all(_GENERIC_LABEL.match(n) for n in given):
        return ["reward"] if labels == 1 else [f"label{i}" for i in range(labels)]
    return [re.sub(r"[^A-Za-z0-9_.\-]+", "_", n).strip("_") or f"label{i}" for i, n in enumerate(given)]


def read_heads(checkpoint: Path, config, names: list[str]) -> RewardHeads:
    """The classification layer as float32 fixed-weight heads (the mean of the labels), shape checked."""
    from safetensors import safe_open

    files = tensor_files(checkpoint)
    labels, hidden = len(names), config.hidden_size
    heads = RewardHeads(
        HeadsConfig(objectives=[Objective(name=n) for n in names], hidden_size=hidden, kind="fixed")
    )
    state = heads.state_dict()
    for ours, theirs, required in (("weight", f"{HEAD}.weight", True), ("bias", f"{HEAD}.bias", False)):
        if theirs not in files:
            if required:
                raise CheckpointError(
                    f"{checkpoint}: tensor {theirs!r} (the classification head) not found in its safetensors"
                )
            state[f"regression.{ours}"] = torch.zeros(labels)
            continue
        with safe_open(str(files[theirs]), framework="pt") as f:
            tensor = f.get_tensor(theirs)
        want = [labels, hidden] if ours == "weight" else [labels]
        if list(tensor.shape) != want:
            raise CheckpointError(
                f"{files[theirs].name}: {theirs} has shape {list(tensor.shape)}, expected {want} from "
                f"config.json (num_labels={labels}, hidden_size={hidden})"
            )
        state[f"regression.{ours}"] = tensor.float()
    heads.load_state_dict(state)
    return heads.eval()


def load_classifier(
    checkpoint: str | os.PathLike, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
):
    """(config, DecoderRewardModel, tokenizer) for a `*ForSequenceClassification` checkpoint, no remote code."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from polyreward.models.torch.reward_model import attention_for, build_reward_model

    path = Path(checkpoint)
    config = read_config(path)
    heads = read_heads(path, config, objective_names(config, names))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        log.warning("%s: the tokenizer has no chat template; conversations use the generic one", path)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # `score.*` are unexpected keys for the bare backbone: read above
    try:
        backbone, info = AutoModel.from_pretrained(
            path, config=config, attn_implementation=attention_for(config), dtype=dtype, use_safetensors=True,
            output_loading_info=True,
        )  # fmt: skip
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # transformers would initialise them at random: a silently wrong model
        missing = sorted(info["missing_keys"])
        raise CheckpointError(
            f"{path}: backbone tensors missing from its safetensors: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return config, build_reward_model(backbone.eval(), heads, "decoder"), tokenizer


def import_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    options: ExportOptions,
    objectives: Sequence[str] | None = None,
) -> Manifest:
    """Write an artifact for a `*ForSequenceClassification` checkpoint. fp16 alone never makes an fp32 copy.

    `options.max_length` defaults to the model's context, at most `DECODER_MAX_LENGTH`; `name` to the
    checkpoint directory's name.
    """
    path = Path(checkpoint).resolve()
    config, model, tokenizer = load_classifier(path, objectives, dtype=options.load_dtype("decoder"))
    policy = input_policy(
        config, tokenizer, "decoder", max_length=options.max_length,
        padding_side=options.padding_side,
    )  # fmt: skip
    options = replace(
        options, name=options.name or path.name,
        provenance={**options.provenance, "imported_from": "hf-sequence-classification", "checkpoint": str(path)},
    )  # fmt: skip
    return write_artifact(model, config, tokenizer, policy, out, options, backbone_id=str(path))
