"""Tiny, locally built decoder backbones and tokenizers for tests (no download ever happens)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from polyreward.models.runtime.objectives import Objective
from polyreward.models.torch.heads import GatingConfig, HeadsConfig, MixtureConfig, RewardHeads, save_heads

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
# Mistral-style: [INST] turns, the reply closed by EOS (system and tool turns are rendered like user turns).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)
# Gemma-style: <start_of_turn>role ... <end_of_turn>, the assistant called `model`.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Reward models score responses to prompts on helpfulness, harmlessness and honesty.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "user assistant system: please explain, thank you! 0123456789",
]


# Llama 3's pre-tokenizer split: newline runs are kept whole, so "\n\n" is one token as in the real tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _bpe(special: list[str], vocab_size: int = 420, llama3: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if llama3
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [*CORPUS, "<|end_header_id|>\n\nSure.\n\nFirst, see below.\n\n"] if llama3 else CORPUS
    tok.train_from_iterator(corpus * 20, trainer)
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
        tokenizer_object=_bpe(special, llama3=True),
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


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(special),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=special[3:],
    )
    tok.chat_template = MISTRAL_TEMPLATE
    return tok  # no pad token, like Mistral: padding falls back to eos


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(special),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=special[4:],
    )
    tok.chat_template = GEMMA_TEMPLATE
    return tok


DECODER_FAMILIES = ["llama", "qwen2", "mistral", "gemma2"]
# Sliding window of the tiny Mistral and Gemma2: shorter than most test conversations, so the windowed
# attention path really masks something.
SLIDING_WINDOW = 16


def tiny_config(family: str):
    """(config, tokenizer) of a randomly initialised 2-layer decoder (hidden 64) of `family`.

    Families: llama (Llama 3 template, no pad token), qwen2 and qwen3 (ChatML; qwen3 normalizes q and k),
    mistral ([INST] template, no pad token, sliding window) and gemma2 (<start_of_turn> template; layers
    alternate sliding and full attention, attention logits soft-capped, embeddings scaled by sqrt(hidden)).
    """
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "llama":
        tok = llama3_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), **common)
    elif family in ("qwen2", "qwen3"):
        tok = chatml_tokenizer()
        config = (Qwen2Config if family == "qwen2" else Qwen3Config)(vocab_size=len(tok), **common)
    elif family == "mistral":
        tok = mistral_tokenizer()
        config = MistralConfig(vocab_size=len(tok), head_dim=16, sliding_window=SLIDING_WINDOW, **common)
    elif family == "gemma2":
        tok = gemma_tokenizer()
        # initializer_range 0.1: attention logits large enough that the soft-capping tanh(x / 5) * 5 is far
        # from the identity (at the default 0.02 it changes hidden states by < 1e-5).
        config = Gemma2Config(
            vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
            attn_logit_softcapping=5.0, initializer_range=0.1, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            **common,
        )  # fmt: skip
    else:
        raise ValueError(
            f"unknown decoder family {family!r}; choose from {', '.join(DECODER_FAMILIES)}, qwen3"
        )
    return config, tok


def tiny_decoder(out: Path, family: str) -> Path:
    """Save a random tiny decoder backbone of `family` (`tiny_config`) with its tokenizer into `out`."""
    config, tok = tiny_config(family)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_classifier(out: Path, family: str, labels: list[str] | None = None) -> Path:
    """Save a random tiny `*ForSequenceClassification` of `family` into `out`: one generic label, or `labels`
    as its id2label. Its `score` layer is scaled up, so rewards differ by more than the parity tolerance."""
    config, tok = tiny_config(family)
    if labels:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {n: i for i, n in enumerate(labels)}
    else:
        config.num_labels = 1
    if config.pad_token_id is None and tok.pad_token_id is not None:
        config.pad_token_id = tok.pad_token_id
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_heads(
    path: Path, hidden: int, k: int = 3, kind: str = "moe", seed: int = 0, components: str = "fixed"
) -> Path:
    """Heads with random weights (for exact-parity tests, where values need not mean anything); mixture
    heads have two groups, 'a' and 'b', with `components` fixed or gated."""
    torch.manual_seed(seed)
    small = GatingConfig(temperature=2.0, hidden_dim=32, n_hidden=2)
    cfg = HeadsConfig(
        objectives=[Objective(name=f"objective{i}") for i in range(k)],
        hidden_size=hidden,
        kind=kind,
        gating=small if kind == "moe" else None,
        mixture=MixtureConfig(
            groups=["a", "b"], router=small, components=components, component_gating=small
        ) if kind == "mixture" else None,
    )  # fmt: skip
    heads = RewardHeads(cfg)
    with torch.no_grad():
        heads.transform.copy_(torch.eye(k) + 0.1 * torch.randn(k, k))
        if heads.gating is not None:
            heads.gating.logit_scale.fill_(1.7)
        if heads.mixture is not None and heads.mixture.components is None:
            heads.mixture.group_logits.normal_()
            heads.mixture.group_scale.uniform_(0.5, 2.0)
    save_heads(heads, path)
    return path
