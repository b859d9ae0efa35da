"""Tiny, locally built decoder backbones and tokenizers for tests (no download ever happens)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModel, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from models.heads import GatingConfig, HeadsConfig, RewardHeads, save_heads
from models.objectives import Objective

# Llama 3's own chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Reward models score responses to prompts on helpfulness, harmlessness and honesty.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "user assistant system: please explain, thank you! 0123456789",
]


def _bpe(special: list[str], vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(special),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=special[1:4],
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok  # no pad token, like Llama 3: padding falls back to eos


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(special),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_decoder(out: Path, family: str) -> Path:
    """Save a randomly initialised 2-layer Llama or Qwen2 (hidden 64) with its tokenizer into `out`."""
    tok = llama3_tokenizer() if family == "llama" else chatml_tokenizer()
    cls = LlamaConfig if family == "llama" else Qwen2Config
    config = cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_heads(path: Path, hidden: int, k: int = 3, kind: str = "moe", seed: int = 0) -> Path:
    """Heads with random weights (for exact-parity tests, where values need not mean anything)."""
    torch.manual_seed(seed)
    cfg = HeadsConfig(
        objectives=[Objective(name=f"objective{i}") for i in range(k)],
        hidden_size=hidden,
        kind=kind,
        gating=GatingConfig(temperature=2.0, hidden_dim=32, n_hidden=2) if kind == "moe" else None,
    )
    heads = RewardHeads(cfg)
    with torch.no_grad():
        heads.transform.copy_(torch.eye(k) + 0.1 * torch.randn(k, k))
        if heads.gating is not None:
            heads.gating.logit_scale.fill_(1.7)
    save_heads(heads, path)
    return path
