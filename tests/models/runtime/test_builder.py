"""The input builder: formats, positions, truncation, padding — on real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from support.tinymodels import chatml_tokenizer, llama3_tokenizer
from transformers import AutoTokenizer

from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.builder import InputBuilder, InputTooLong, TemplateRefused, render_plain
from polyreward.models.runtime.items import ChatItem, PromptItem, TextItem
from polyreward.models.runtime.manifest import InputPolicy

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


@pytest.fixture(scope="module")
def minilm_tokenizer(backbone_dirs):
    return AutoTokenizer.from_pretrained(backbone_dirs["minilm"])


def builder(tokenizer, kind, max_length=512, truncation="left", padding_side=None):
    policy = InputPolicy(
        template=InputBuilder.template_for(tokenizer),
        max_length=max_length,
        truncation=truncation,
        padding_side=padding_side or ("left" if kind == "decoder" else "right"),
    )
    return InputBuilder(tokenizer, kind, policy)


@pytest.mark.parametrize("make", [llama3_tokenizer, chatml_tokenizer, "minilm"])
def test_three_formats_encode_identically(make, minilm_tokenizer):
    tok = minilm_tokenizer if make == "minilm" else make()
    kind = "encoder" if make == "minilm" else "decoder"
    b = builder(tok, kind)
    messages = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    rendered = b.render(ChatItem(messages=messages).messages)
    as_pair, as_messages, as_text = b.build(
        [
            PromptItem(prompt="Name a prime.", response="Seven."),
            ChatItem(messages=messages),
            TextItem(text=rendered),
        ]
    )
    assert as_pair == as_messages == as_text
    assert (as_pair.prompt_ids is None) == (kind == "decoder")


def test_llama3_gating_position_is_the_eot_before_the_last_assistant_turn():
    tok = llama3_tokenizer()
    b = builder(tok, "decoder")
    (enc,) = b.build([ChatItem(messages=CHAT)])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert enc.input_ids[enc.gating_pos] == eot
    # Everything up to and including the gating token is exactly the rendered prompt part.
    prompt_text = b.render(ChatItem(messages=CHAT).messages[:-1])
    assert tok.decode(enc.input_ids[: enc.gating_pos + 1]) == prompt_text
    # ...and what follows starts the final assistant turn.
    assert tok.decode(enc.input_ids[enc.gating_pos + 1 :]).startswith("<|start_header_id|>assistant")
    assert enc.input_ids[-1] == eot  # the reward is read at the response's closing token


def test_chatml_gating_position_ends_the_prompt_part():
    tok = chatml_tokenizer()
    b = builder(tok, "decoder")
    (enc,) = b.build([ChatItem(messages=CHAT)])
    assert tok.decode(enc.input_ids[: enc.gating_pos + 1]) == b.render(ChatItem(messages=CHAT).messages[:-1])


def test_plain_template_and_marker(minilm_tokenizer):
    b = builder(minilm_tokenizer, "encoder")
    assert b.response_marker == "\n\nAssistant: "
    assert render_plain(PromptItem(prompt="a", response="b").as_messages()) == "User: a\n\nAssistant: b"
    (enc,) = b.build([TextItem(text="no marker in here at all")])
    # No assistant marker: the whole text is the gating input.
    assert enc.prompt_ids == enc.input_ids


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_truncation_keeps_the_end_of_the_response_and_the_leading_special(kind, minilm_tokenizer):
    tok = minilm_tokenizer if kind == "encoder" else llama3_tokenizer()
    long_prompt = " ".join(f"word{i}" for i in range(400))
    item = PromptItem(prompt=long_prompt, response="The final answer is forty-two, as computed above.")
    (full,) = builder(tok, kind, max_length=4096).build([item])
    (cut,) = builder(tok, kind, max_length=64).build([item])
    assert not full.truncated and cut.truncated
    assert cut.tokens == 64 < full.tokens
    assert cut.input_ids[0] == full.input_ids[0]  # CLS / BOS kept
    assert cut.input_ids[-40:] == full.input_ids[-40:]  # the response's end survives
    if kind == "decoder":
        # the gating token moved with the cut and is still the prompt's closing <|eot_id|>
        assert cut.input_ids[cut.gating_pos] == full.input_ids[full.gating_pos]
        assert cut.tokens - cut.gating_pos == full.tokens - full.gating_pos
    with pytest.raises(InputTooLong, match=r"items\[0\]: .* exceeds max_length 64"):
        builder(tok, kind, max_length=64, truncation="error").build([item])
    with pytest.raises(InputTooLong, match=r"items\[0\]: "):  # a per-call override of a "left" policy
        builder(tok, kind, max_length=64).build([item], truncation="error")
    assert builder(tok, kind, max_length=64, truncation="error").build([item], truncation="left")[0].truncated


def test_response_longer_than_max_length_keeps_its_end():
    tok = llama3_tokenizer()
    item = PromptItem(prompt="Hi", response=" ".join(f"tok{i}" for i in range(300)) + " THE END")
    (full,) = builder(tok, "decoder", max_length=4096).build([item])
    (cut,) = builder(tok, "decoder", max_length=32).build([item])
    assert cut.input_ids[-12:] == full.input_ids[-12:]
    assert cut.gating_pos == 1  # whole prompt dropped: falls back to the last protected leading special


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_decoder_positions_follow_padding(side):
    b = builder(llama3_tokenizer(), "decoder")
    encs = b.build([PromptItem(prompt="a", response="b"), ChatItem(messages=CHAT)])
    arr = collate(encs, kind="decoder", pad_id=b.pad_id, padding_side=side)
    length = arr["input_ids"].shape[1]
    for row, e in enumerate(encs):
        real = np.flatnonzero(arr["attention_mask"][row])
        assert arr["input_ids"][row, real].tolist() == list(e.input_ids)
        assert (real[0] == length - e.tokens) if side == "left" else (real[0] == 0)
        assert arr["input_ids"][row, arr["gating_index"][row]] == e.input_ids[e.gating_pos]


def test_collate_encoder_deduplicates_prompts(minilm_tokenizer):
    b = builder(minilm_tokenizer, "encoder")
    encs = b.build(
        [
            PromptItem(prompt="p1", response="a"),
            PromptItem(prompt="p2", response="b"),
            PromptItem(prompt="p1", response="c"),
        ]
    )
    arr = collate(encs, kind="encoder", pad_id=b.pad_id, padding_side="right")
    assert arr["prompt_input_ids"].shape[0] == 2
    assert arr["prompt_index"].tolist() == [0, 1, 0]
    assert "gating_index" not in arr


def test_a_chat_template_that_raises_is_an_input_error_naming_the_item():
    tok = llama3_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TemplateRefused, match=r"items\[1\]: .*template refused .*System role not supported"):
        builder(tok, "decoder").build([ChatItem(messages=CHAT[1:3]), ChatItem(messages=CHAT)])
