"""The PyTorch reward model: a transformers backbone plus `RewardHeads`, in the exact form that is exported.

Two wrappers share the heads and differ in how they get embeddings (the README's "How inputs become tokens"):

* `EncoderRewardModel`: rewards from the masked mean over the whole conversation; gating from the masked mean
  over each distinct prompt, encoded on its own (`prompt_index` maps items to prompt rows).
* `DecoderRewardModel`: one causal pass; rewards at the last real token, gating at `gating_index`; position
  ids come from the mask so left padding is exact.

Their forward signatures are the ONNX graph's inputs, and the same int64 arrays from `polyreward.models.runtime.batching.collate`
feed both, so the PyTorch reference and the ONNX graph always see identical inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.builder import Encoded, Kind
from polyreward.models.torch.heads import HeadsError, RewardHeads

ENCODER_INPUTS = ["input_ids", "attention_mask", "prompt_input_ids", "prompt_attention_mask", "prompt_index"]
DECODER_INPUTS = ["input_ids", "attention_mask", "gating_index"]
EMBEDDING_OUTPUTS = ["reward_embedding", "gating_embedding"]


def detect_kind(config) -> Kind:
    """Encoder if transformers knows a masked-LM head for this model type (BERT, RoBERTa, ...), else decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden[n, index[n], :] for every row n, as an ONNX-friendly gather."""
    return torch.gather(hidden, 1, index[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)


class EncoderRewardModel(nn.Module):
    kind: Kind = "encoder"

    def __init__(self, backbone: nn.Module, heads: RewardHeads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def input_names(self) -> list[str]:
        return ENCODER_INPUTS if self.heads.needs_gating_input else ENCODER_INPUTS[:2]

    def output_names(self) -> list[str]:
        return self.heads.output_names

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def embeddings(
        self, input_ids, attention_mask, prompt_input_ids=None, prompt_attention_mask=None, prompt_index=None
    ):
        """(reward embedding, gating embedding or None) per item; each distinct prompt is encoded once."""
        reward_emb = self._pool(input_ids, attention_mask)
        if prompt_input_ids is None:
            return reward_emb, None
        return reward_emb, self._pool(prompt_input_ids, prompt_attention_mask).index_select(0, prompt_index)

    def forward(
        self, input_ids, attention_mask, prompt_input_ids=None, prompt_attention_mask=None, prompt_index=None
    ):
        return self.heads(
            *self.embeddings(input_ids, attention_mask, prompt_input_ids, prompt_attention_mask, prompt_index)
        )


class DecoderRewardModel(nn.Module):
    kind: Kind = "decoder"

    def __init__(self, backbone: nn.Module, heads: RewardHeads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def input_names(self) -> list[str]:
        return DECODER_INPUTS

    def output_names(self) -> list[str]:
        return self.heads.output_names

    def embeddings(self, input_ids, attention_mask, gating_index):
        """(reward embedding, gating embedding) per item, both from one causal pass."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask * positions).amax(-1)  # last real token, for left and right padding alike
        return gather_rows(hidden, last), gather_rows(hidden, gating_index)

    def forward(self, input_ids, attention_mask, gating_index):
        return self.heads(*self.embeddings(input_ids, attention_mask, gating_index))


RewardModel = EncoderRewardModel | DecoderRewardModel


class Embedder(nn.Module):
    """The reward model without its heads: pooled embeddings, for featurization through ONNX Runtime.

    Encoders take one batch of sequences and return their pooled embedding (a prompt is just another
    sequence); decoders return (reward embedding, gating embedding) from their one pass.
    """

    def __init__(self, model: RewardModel):
        super().__init__()
        self.model = model
        self.kind = model.kind

    def input_names(self) -> list[str]:
        return ENCODER_INPUTS[:2] if self.kind == "encoder" else DECODER_INPUTS

    def output_names(self) -> list[str]:
        return EMBEDDING_OUTPUTS[:1] if self.kind == "encoder" else EMBEDDING_OUTPUTS

    def forward(self, input_ids, attention_mask, gating_index=None):
        if self.kind == "encoder":
            return self.model.embeddings(input_ids, attention_mask)[0]
        return self.model.embeddings(input_ids, attention_mask, gating_index)


def attention_for(config) -> str:
    """The attention implementation a backbone loads with: eager for encoders (the form ONNX Runtime's
    transformer optimizer fuses, docs/architecture.md), `polyreward.models.torch.attention` for decoders."""
    from polyreward.models.torch import attention

    return "eager" if detect_kind(config) == "encoder" else attention.register()


def load_backbone(backbone_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (config, backbone, tokenizer) from a local directory (`attention_for`), no hub access."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(backbone_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json — expected a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path)
    # use_safetensors: weights are never unpickled, so a directory with only pytorch_model.bin is refused.
    backbone = AutoModel.from_pretrained(
        path, attn_implementation=attention_for(config), dtype=dtype, use_safetensors=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return config, backbone, tokenizer


def build_reward_model(backbone: nn.Module, heads: RewardHeads, kind: Kind) -> RewardModel:
    hidden = backbone.config.hidden_size
    if heads.cfg.hidden_size != hidden:
        raise HeadsError(f"heads expect hidden size {heads.cfg.hidden_size}, the backbone has {hidden}")
    cls = EncoderRewardModel if kind == "encoder" else DecoderRewardModel
    return cls(backbone, heads).eval()


def build_embedder(backbone: nn.Module, kind: Kind) -> Embedder:
    """The backbone and pooling of a reward model, without heads."""
    from polyreward.models.runtime.objectives import Objective
    from polyreward.models.torch.heads import HeadsConfig

    cfg = HeadsConfig(
        objectives=[Objective(name="stub")], hidden_size=backbone.config.hidden_size, kind="fixed"
    )
    return Embedder(build_reward_model(backbone, RewardHeads(cfg), kind)).eval()


def torch_inputs(
    model: RewardModel, batch: Sequence[Encoded], pad_id: int, padding_side: str, names: list[str]
):
    arrays = collate(batch, kind=model.kind, pad_id=pad_id, padding_side=padding_side)
    device = next(model.parameters()).device
    return [torch.from_numpy(arrays[n]).to(device) for n in names]


@torch.inference_mode()
def score_torch(
    model: RewardModel, batch: Sequence[Encoded], *, pad_id: int, padding_side: str = "right"
) -> dict[str, np.ndarray]:
    """Run the PyTorch model on one batch of encoded items; returns rewards, gating, score (and uncertainty)."""
    outputs = model(*torch_inputs(model, batch, pad_id, padding_side, model.input_names()))
    return {n: t.float().cpu().numpy() for n, t in zip(model.output_names(), outputs, strict=True)}


@torch.inference_mode()
def embed_torch(
    model: RewardModel, batch: Sequence[Encoded], *, pad_id: int, padding_side: str = "right"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled (reward, gating) embeddings of one batch as float32 numpy, for training heads."""
    names = ENCODER_INPUTS if model.kind == "encoder" else DECODER_INPUTS
    reward_emb, gating_emb = model.embeddings(*torch_inputs(model, batch, pad_id, padding_side, names))
    as_np = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    return as_np(reward_emb), as_np(gating_emb)
