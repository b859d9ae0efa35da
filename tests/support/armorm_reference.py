"""A tiny ArmoRM checkpoint in the official layout, and a plain-PyTorch reference of the official forward pass.

The reference follows RLHFlow/ArmoRM-Llama3-8B-v0.1's modeling_custom.py and shares no code with `models`:
it reads the checkpoint's files itself, runs `LlamaModel` on ONE unpadded conversation (as the official
example does), reads the reward at the last token and the gating input at the `<|eot_id|>` that begins the last
occurrence of the assistant header in the token ids.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from support.tinymodels import llama3_tokenizer

HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
K = 19
GATING = {"gating_temperature": 0.5, "gating_hidden_dim": 32, "gating_n_hidden": 3}


TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 2048,
}  # fmt: skip


def tiny_armorm(out: Path, shape: dict | None = None) -> Path:
    """A random Llama (2 layers, hidden 64, or `shape`) with ArmoRM's heads, saved like the hub checkpoint: bf16
    weights in two safetensors shards with an index, config.json with the head fields and the remote-code
    `auto_map`. The vocabulary is the test tokenizer's, or `shape["vocab_size"]` rows (the extra ones unused)."""
    tok = llama3_tokenizer()
    config = LlamaConfig(
        **({"vocab_size": len(tok)} | TINY | (shape or {})), tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    with torch.device("meta") if shape else contextlib.nullcontext():
        names = LlamaModel(config).state_dict() if shape else None
    state = (
        {
            f"model.{k}": torch.ones(v.shape, dtype=torch.bfloat16)
            if k.endswith("norm.weight")
            else 0.02 * torch.randn(v.shape, dtype=torch.bfloat16)
            for k, v in names.items()
        }
        if names is not None  # large shapes: random bf16 straight away, never a float32 copy
        else {f"model.{k}": v for k, v in LlamaModel(config).state_dict().items()}
    )
    d, h = config.hidden_size, GATING["gating_hidden_dim"]
    dims = [d] + [h] * GATING["gating_n_hidden"] + [K]
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        state[f"gating.layers.{i}.weight"] = torch.randn(b, a) / a**0.5
        state[f"gating.layers.{i}.bias"] = 0.1 * torch.randn(b)
    state["gating.logit_scale"] = torch.tensor([1.7])
    state["regression_layer.weight"] = torch.randn(K, d) / d**0.5
    state["reward_transform_matrix"] = torch.eye(K) + 0.1 * torch.randn(K, K)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, file)
    size = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map})
    )
    raw = (
        config.to_dict()
        | GATING
        | {
            "num_objectives": K,
            "architectures": ["LlamaForRewardModelWithGating"],
            "auto_map": {
                "AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"
            },
            "torch_dtype": "bfloat16",
        }
    )
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(out)
    return out


class GatingNetwork(nn.Module):
    """modeling_custom.py's GatingNetwork (inference: no dropout)."""

    def __init__(self, in_features, out_features, temperature, hidden_dim, n_hidden):
        super().__init__()
        self.temperature = temperature
        layers = []
        for _ in range(n_hidden):
            layers.append(nn.Linear(in_features, hidden_dim))
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, out_features))
        self.layers = nn.ModuleList(layers)
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


class ArmoRMReference(nn.Module):
    def __init__(self, checkpoint: Path):
        super().__init__()
        raw = json.loads((checkpoint / "config.json").read_text())
        config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
        state = {}
        for file in sorted(checkpoint.glob("*.safetensors")):
            state |= {k: v.float() for k, v in load_file(str(file)).items()}
        self.model = LlamaModel(config).eval()
        self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        )
        k, d = raw["num_objectives"], config.hidden_size
        self.regression_layer = nn.Linear(d, k, bias=False)
        self.gating = GatingNetwork(
            d, k, raw["gating_temperature"], raw["gating_hidden_dim"], raw["gating_n_hidden"]
        )
        self.reward_transform_matrix = nn.Parameter(torch.zeros(k, k), requires_grad=False)
        heads = {k: v for k, v in state.items() if not k.startswith("model.")}
        self.load_state_dict(heads, strict=False)
        self.eval()

    @torch.no_grad()
    def forward(self, input_ids: list[int], pattern: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([input_ids])
        hidden = self.model(input_ids=ids).last_hidden_state[0]
        starts = [
            j
            for j in range(len(input_ids) - len(pattern), -1, -1)
            if input_ids[j : j + len(pattern)] == pattern
        ]
        if not starts:
            raise ValueError("Token pattern not found in the list.")
        rewards = self.regression_layer(hidden[-1:])
        gating = self.gating(hidden[starts[0]][None])
        score = torch.sum(gating * (rewards @ self.reward_transform_matrix), dim=1)
        return {"rewards": rewards[0], "gating": gating[0], "score": score[0]}


def reference_outputs(checkpoint: Path, conversations: list[list[dict]]) -> list[dict[str, torch.Tensor]]:
    """The reference's outputs for chat conversations, tokenized as the official example does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    pattern = tok.encode(HEADER, add_special_tokens=False)
    ref = ArmoRMReference(checkpoint)
    return [ref(tok.apply_chat_template(c, tokenize=True, return_dict=False), pattern) for c in conversations]
