"""Import an ArmoRM checkpoint (RLHFlow/ArmoRM-Llama3-8B-v0.1, or any checkpoint in its layout) as an artifact.

The official model needs `trust_remote_code` for its `modeling_custom.py`; this module reads the same files
without running any of them and re-expresses the model with our own backbone wrapper and heads:

* config.json: a Llama config plus `num_objectives`, `gating_temperature`, `gating_hidden_dim`,
  `gating_n_hidden` (the official code's defaults when absent: 19, 10, 1024, 3);
* weights (safetensors, sharded with an index or not): `model.*` (the Llama backbone),
  `regression_layer.weight` [K, D] (no bias), `gating.layers.{i}.weight/bias`, `gating.logit_scale`,
  `reward_transform_matrix` [K, K].

Semantics, as the official forward pass computes them:

    rewards = regression_layer(h[last real token])
    gating  = softmax(MLP(h[g]) / temperature) * logit_scale
    score   = sum(gating * (rewards @ reward_transform_matrix))

where g is the `<|eot_id|>` that begins the LAST occurrence of `ASSISTANT_HEADER` in the token ids; the
artifact records it as `input.gating_marker`, so the input builder finds the same token and refuses a
conversation without it instead of scoring it wrongly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from polyreward.models.runtime.builder import input_policy
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.manifest import Manifest
from polyreward.models.runtime.objectives import Objective
from polyreward.models.torch.export import ExportOptions, write_artifact
from polyreward.models.torch.heads import GatingConfig, HeadsConfig, RewardHeads

log = logging.getLogger("polyreward.armorm")

ASSISTANT_HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
# ArmoRM-Llama3-8B-v0.1's objectives, in the order of its regression layer's rows.
ARMORM_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)  # fmt: skip
# The official modeling_custom.py's defaults for fields config.json may omit.
CONFIG_DEFAULTS = {
    "num_objectives": 19,
    "gating_temperature": 10.0,
    "gating_hidden_dim": 1024,
    "gating_n_hidden": 3,
}
_ARMORM_FIELDS = (*CONFIG_DEFAULTS, "architectures", "auto_map")


class CheckpointError(PolyrewardError):
    """The directory is not an ArmoRM-layout checkpoint, or its tensors do not match its config."""


def read_config(checkpoint: Path):
    """(transformers config of the backbone, ArmoRM head fields). `auto_map` is dropped: no remote code."""
    from transformers import AutoConfig

    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json — expected a Hugging Face checkpoint directory")
    raw = json.loads(path.read_text())
    armo = {k: raw.get(k, v) for k, v in CONFIG_DEFAULTS.items()}
    model_type = raw.get("model_type")
    if not model_type:
        raise CheckpointError(f"{path}: no model_type")
    config = AutoConfig.for_model(
        model_type, **{k: v for k, v in raw.items() if k not in (*_ARMORM_FIELDS, "model_type")}
    )
    return config, armo


def tensor_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from `model.safetensors.index.json` or the lone `model.safetensors`."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{checkpoint}: no model.safetensors or model.safetensors.index.json (only safetensors weights are "
            "read; convert .bin checkpoints first)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_heads(checkpoint: Path, config, armo: dict) -> RewardHeads:
    """The regression layer, gating network and transform as float32 `RewardHeads`, shapes checked."""
    from safetensors import safe_open

    files = tensor_files(checkpoint)
    k, d = int(armo["num_objectives"]), config.hidden_size
    gating = GatingConfig(
        temperature=armo["gating_temperature"],
        hidden_dim=armo["gating_hidden_dim"],
        n_hidden=armo["gating_n_hidden"],
    )
    if k == len(ARMORM_OBJECTIVES):
        objectives = [Objective(name=n, source=n.split("-")[0]) for n in ARMORM_OBJECTIVES]
    else:
        log.warning("%d objectives, not ArmoRM-Llama3-8B-v0.1's 19: naming them objective0..", k)
        objectives = [Objective(name=f"objective{i}") for i in range(k)]
    heads = RewardHeads(HeadsConfig(objectives=objectives, hidden_size=d, kind="moe", gating=gating))
    ours = {"regression.weight": "regression_layer.weight", "transform": "reward_transform_matrix"}
    ours |= {f"gating.{n}": f"gating.{n}" for n, _ in heads.gating.named_parameters()}  # type: ignore[union-attr]
    state = heads.state_dict()
    for name, theirs in ours.items():
        if theirs not in files:
            if theirs == f"gating.layers.{gating.n_hidden}.bias":  # the output layer, built with bias=False
                state[name] = torch.zeros_like(state[name])
                continue
            raise CheckpointError(f"{checkpoint}: tensor {theirs!r} not found in the checkpoint")
        with safe_open(str(files[theirs]), framework="pt") as f:
            tensor = f.get_tensor(theirs)
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{files[theirs].name}: {theirs} has shape {list(tensor.shape)}, expected "
                f"{list(state[name].shape)} from config.json (num_objectives={k}, hidden_size={d}, "
                f"gating_hidden_dim={gating.hidden_dim}, gating_n_hidden={gating.n_hidden})"
            )
        state[name] = tensor.float()
    state["regression.bias"] = torch.zeros(k)  # ArmoRM's regression layer has no bias
    heads.load_state_dict(state)
    return heads.eval()


def load_armorm(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(config, DecoderRewardModel, tokenizer) for an ArmoRM-layout checkpoint, without remote code."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from polyreward.models.torch.reward_model import attention_for, build_reward_model

    path = Path(checkpoint)
    config, armo = read_config(path)
    heads = read_heads(path, config, armo)
    tokenizer = AutoTokenizer.from_pretrained(path)
    missing = [
        t for t in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>") if t not in tokenizer.vocab
    ]
    if missing:
        raise CheckpointError(f"{path}: the tokenizer lacks Llama-3's special tokens {missing}")
    # AutoModel loads the `model.*` tensors into the bare backbone; the head tensors were read above, so its
    # report of them as unexpected keys is noise.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        backbone = AutoModel.from_pretrained(
            path, config=config, attn_implementation=attention_for(config), dtype=dtype, use_safetensors=True
        ).eval()
    finally:
        transformers_logging.set_verbosity(verbosity)
    return config, build_reward_model(backbone, heads, "decoder"), tokenizer


def import_armorm(checkpoint: str | os.PathLike, out: str | os.PathLike, options: ExportOptions) -> Manifest:
    """Write an artifact for an ArmoRM-layout checkpoint. fp16 alone never materialises an fp32 copy.

    `options.max_length` defaults to the model's whole context (the official code never truncates), `name` to
    the checkpoint directory's name.
    """
    path = Path(checkpoint).resolve()
    config, model, tokenizer = load_armorm(path, dtype=options.load_dtype("decoder"))
    policy = input_policy(
        config, tokenizer, "decoder", max_length=options.max_length or config.max_position_embeddings
    ).model_copy(update={"gating_marker": ASSISTANT_HEADER})
    options = replace(
        options, name=options.name or path.name,
        provenance={**options.provenance, "imported_from": "armorm", "checkpoint": str(path)},
    )  # fmt: skip
    return write_artifact(model, config, tokenizer, policy, out, options, backbone_id=str(path))
