"""Rule objectives (polyreward.models.runtime.rules): each kind on constructed cases and on real RMB replies,
the time limit against pathological inputs, and rule files that fail naming the file, the rule and the field."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest
import yaml

from polyreward.models.runtime.items import parse_item
from polyreward.models.runtime.rules import RuleError, RuleSet, length_value, normalize_answer


def rule_set(tmp_path, spec: dict, name: str = "rules.yaml") -> RuleSet:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return RuleSet.load(path)


def items(*replies, labels=None):
    labels = labels or [None] * len(replies)
    return [
        parse_item({"prompt": "q", "response": r, "label": lab})
        for r, lab in zip(replies, labels, strict=True)
    ]


@pytest.fixture(scope="module")
def rmb_replies(data_dir) -> list[str]:
    """The chosen and rejected replies of the first 300 RMB pairs (real model outputs, very mixed lengths)."""
    out = []
    with gzip.open(data_dir / "rmb" / "pairwise.jsonl.gz", "rt") as f:
        for line, _ in zip(f, range(300), strict=False):
            row = json.loads(line)
            out += [row["chosen"], row["rejected"]]
    return out


def test_length_in_words_and_tokens_on_real_replies(tmp_path, rmb_replies):
    rules = rule_set(tmp_path, {"rules": {
        "words": {"kind": "length", "min": 50, "max": 300, "tolerance": 100},
        "tokens": {"kind": "length", "unit": "tokens", "min": 10, "max": 400},
    }})  # fmt: skip
    its = items(*rmb_replies)
    counts = {
        "tokens": lambda texts: [len(t) // 4 for t in texts]
    }  # any tokenizer: the rule reads its counts
    values = rules.evaluate(its, its, counts["tokens"]).values
    for reply, (words, tokens) in zip(rmb_replies, values, strict=True):
        n = len(reply.split())
        d = max(50 - n, n - 300, 0)
        assert words == pytest.approx(max(0.0, 1 - d / 100))
        assert tokens == float(10 <= len(reply) // 4 <= 400)
    assert 0 < values[:, 0].mean() < 1 and len({*values[:, 0]}) > 3  # real replies fall in, near and far out


def test_format_matches_pythons_re_on_real_replies(tmp_path, rmb_replies):
    """RE2 search agrees with Python's re for patterns both support (a markdown list, a code block, a closing
    question)."""
    patterns = [r"(?m)^\s*(\d+\.|[-*]) \S", r"\*\*[^*\n]+\*\*", r"(?i)\b(sorry|cannot)\b"]
    rules = rule_set(
        tmp_path, {"rules": {f"p{i}": {"kind": "format", "pattern": p} for i, p in enumerate(patterns)}}
    )
    values = rules.evaluate(its := items(*rmb_replies), its).values
    for j, p in enumerate(patterns):
        want = [float(re.search(p, r) is not None) for r in rmb_replies]
        assert values[:, j].tolist() == want
        assert 0 < sum(want) < len(want)


def test_strip_reasoning_traces_and_what_each_rule_reads(tmp_path):
    rules = rule_set(tmp_path, {
        "strip": {"pattern": r"(?s)<think>.*?</think>\s*"},
        "rules": {
            "format": {"kind": "format", "pattern": r"(?s)^<think>.+</think>\s*\S", "input": "original"},
            "has_think": {"kind": "format", "pattern": "<think>"},  # reads the stripped reply
        },
    })  # fmt: skip
    its = items("<think>2+2 is 4, surely</think>\n\nIt is 4.", "It is 5.", "<think>unclosed trace")
    stripped, removed = rules.strip(its)
    assert [s.reply() for s in stripped] == ["It is 4.", "It is 5.", "<think>unclosed trace"]
    assert removed == [len(its[0].reply()) - len("It is 4."), 0, 0]
    assert stripped[0].prompt == "q" and stripped[0].label is None
    assert rules.evaluate(its, stripped).values.tolist() == [[1, 0], [0, 0], [0, 1]]


def test_json_with_and_without_a_schema(tmp_path):
    rules = rule_set(tmp_path, {"rules": {
        "json": {"kind": "json"},
        "answer": {"kind": "json", "extract": r"(?s)```json\s*(.*?)```",
                   "schema": {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}},
    }})  # fmt: skip
    its = items(
        '{"answer": 4}', 'Here:\n```json\n{"answer": 4}\n```', '```json\n{"answer": "four"}\n```', "{nope"
    )
    try:
        assert rules.evaluate(its, its).values.tolist() == [[1, 0], [0, 1], [0, 0], [0, 0]]
    finally:
        rules.close()


def test_exact_and_math_correctness_against_labels(tmp_path):
    rules = rule_set(tmp_path, {"rules": {
        "exact": {"kind": "exact", "extract": r"(?i)answer is:?\s*(.+?)\.?$"},
        "math": {"kind": "math"},
    }})  # fmt: skip
    replies = [
        "So the answer is The Eiffel Tower.",  # exact: articles, case and punctuation do not count
        "The answer is $\\boxed{\\frac{1}{2}}$",  # math: 1/2 = 0.5
        "We get x = 3, so the answer is 4",  # wrong on both
        "No final answer here",
    ]
    its = items(*replies, labels=["eiffel tower", "0.5", "3", "7"])
    try:
        values = rules.evaluate(its, its).values
    finally:
        rules.close()
    assert values[:, 0].tolist() == [1, 0, 0, 0]
    assert values[:, 1].tolist() == [0, 1, 0, 0]
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"


def test_labels_are_required_by_correctness_rules(tmp_path):
    rules = rule_set(tmp_path, {"rules": {"ok": {"kind": "exact"}}})
    rules.check_labels(items("a", labels=["a"]))
    with pytest.raises(ValueError, match=r"label: rule 'ok' compares the reply with a reference answer") as e:
        rules.check_labels(items("a", "b", labels=["a", None]))
    assert e.value.index == 1


def test_a_pathological_pattern_and_input_return_within_the_limit(tmp_path):
    """(a+)+$ on 'aaa…b' backtracks exponentially in Python's re; RE2 is linear. Math that sympy chews on for
    long is killed at the time limit, its value 0 and the reason said, while the other items keep theirs."""
    rules = rule_set(tmp_path, {"time_limit": 1.0, "rules": {
        "evil": {"kind": "format", "pattern": r"^(a+)+$"},
        "math": {"kind": "math", "extract": r"(?s)(\$.*\$)"},
    }})  # fmt: skip
    rules.warm()
    attack = "a" * 1_000_000 + "b"
    tower = "$" + "9^{" * 40 + "9" + "}" * 40 + "$"
    its = items(attack, tower, "The answer is $2$", labels=["1", "2", "2"])
    started = time.perf_counter()
    try:
        out = rules.evaluate(its, its)
    finally:
        rules.close()
    took = time.perf_counter() - started
    assert out.values.tolist() == [[0, 0], [0, 0], [0, 1]], out.errors
    assert out.errors == [{}, {"math": "timed out after 1 s"}, {}]
    assert took < 10.0, took  # the limit and a worker restart (2-5 s here), not the hours sympy would take


def test_length_value_formula():
    from polyreward.models.runtime.rules import LengthRule

    rule = LengthRule(kind="length", min=10, max=20, tolerance=5)
    assert [length_value(rule, n) for n in (10, 20, 8, 22, 25, 100)] == [1, 1, 0.6, 0.6, 0, 0]
    assert length_value(LengthRule(kind="length", min=10), 9) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"rules": {"f": {"kind": "format", "pattern": r"(a)\1"}}},
            r"rules\.f\.format\.pattern: .*RE2 cannot compile",
        ),
        ({"rules": {"f": {"kind": "format", "pattern": "(?=x)"}}}, r"rules\.f\.format\.pattern: .*RE2"),
        (
            {"rules": {"l": {"kind": "length", "min": 10, "max": 5}}},
            r"rules\.l\.length: .*max: 5 is below min 10",
        ),
        (
            {"rules": {"j": {"kind": "json", "schema": {"type": "nope"}}}},
            r"rules\.j\.json\.schema: .*not a valid JSON Schema",
        ),
        (
            {"rules": {"e": {"kind": "exact", "extract": "no group"}}},
            r"rules\.e\.exact\.extract: .*exactly one group",
        ),
        ({"rules": {"m": {"kind": "magic"}}}, r"rules\.m: .*magic"),
        ({"rules": {"bad name": {"kind": "json"}}}, r"rules: .*'bad name' must match"),
        ({"rules": {"f": {"kind": "format", "patern": "x"}}}, r"rules\.f\.format\.(patern|pattern)"),
    ],
)
def test_bad_rule_files_name_the_file_the_rule_and_the_field(tmp_path, spec, message):
    with pytest.raises(RuleError, match=r"^rules: .*bad\.yaml: " + message) as e:
        rule_set(tmp_path, spec, "bad.yaml")
    assert "\n" not in str(e.value)


def test_rule_names_may_not_shadow_learned_objectives(tmp_path):
    rules = rule_set(tmp_path, {"rules": {"helpfulness": {"kind": "json"}}})
    with pytest.raises(RuleError, match=r"rules \['helpfulness'\] have the names of the model's learned"):
        rules.check(["helpfulness", "safety"])
