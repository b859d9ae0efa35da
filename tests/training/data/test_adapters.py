"""Rows to examples: HH transcripts, pairs (A/B labels, ties, pair ratings), best-of-N, ratings."""

from __future__ import annotations

import json
import logging
import math

import pytest
from support.data import PAIRS, pairs_spec, user, write_jsonl

from polyreward.models.runtime.items import Message
from polyreward.training.data import (
    DataError,
    DatasetSpec,
    parse_hh,
    read_dataset,
    split_of,
)

# ---------------------------------------------------------------------------------------------- HH transcripts

HH_PROMPT = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out.  "


def test_parse_hh_splits_turns_into_messages():
    prompt, reply = parse_hh(HH_PROMPT + "\n\nAssistant:  Call a locksmith. \n")
    assert prompt == [
        user("How do I pick a lock?"),
        Message(role="assistant", content="Why do you ask?"),
        user("I'm locked out."),
    ]
    assert reply == "Call a locksmith."
    for bad in ("no markers here", "\n\nHuman: only a question", "preamble\n\nHuman: q\n\nAssistant: a"):
        with pytest.raises(ValueError):
            parse_hh(bad)


def test_hh_pairs_share_the_prompt_part(tmp_path):
    rows = [
        {
            "chosen": HH_PROMPT + "\n\nAssistant: Call a locksmith.",
            "rejected": HH_PROMPT + "\n\nAssistant: Use a pin.",
        },
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    spec = pairs_spec(
        path, prompt=None, hh=True, chosen="chosen", rejected="rejected", objective_value="harmlessness"
    )
    with pytest.raises(
        DataError, match=rf"{path}:2: field 'rejected': its prompt part .* differs from that of 'chosen'"
    ):
        read_dataset(spec)
    (pair,) = read_dataset(spec.model_copy(update={"on_invalid": "skip"})).pairs
    assert len(pair.prompt) == 3 and pair.prompt[-1] == user("I'm locked out.")
    assert (pair.chosen, pair.rejected, pair.objective) == ("Call a locksmith.", "Use a pin.", "harmlessness")


# ---------------------------------------------------------------------------------------------- pairs


def test_ab_labels_map_to_chosen_with_ties_and_skipped_labels(tmp_path, caplog):
    rows = [
        {"instruction": "Fix:", "input": "teh cat", "r1": "the cat", "r2": "teh cat", "lab": 1},
        {"instruction": "Fix:", "input": "", "r1": "x", "r2": "y", "lab": 2},
        {"instruction": "Fix:", "input": None, "r1": "x", "r2": "z", "lab": 0},
        {"instruction": "Fix:", "input": "a", "r1": "x", "r2": "w", "lab": None},
        {"instruction": "Fix:", "input": "a", "r1": "same", "r2": "same", "lab": 1},
    ]
    spec = DatasetSpec(
        name="ab",
        path=str(write_jsonl(tmp_path / "ab.jsonl", rows)),
        kind="pairs",
        prompt=["instruction", "input"],
        response_a="r1",
        response_b="r2",
        label="lab",
        label_a=[1],
        label_b=["2"],
        label_tie=[0],
    )
    with caplog.at_level(logging.INFO, logger="polyreward.data"):
        pairs = read_dataset(spec).pairs
    assert [(p.prompt[0].content, p.chosen, p.rejected, p.tie) for p in pairs] == [
        ("Fix:\n\nteh cat", "the cat", "teh cat", False),
        ("Fix:", "y", "x", False),
        ("Fix:", "x", "z", True),
    ]
    assert "5 rows" in caplog.text and "3 pairs (1 ties)" in caplog.text
    assert "1 label None not in label_a, label_b or label_tie" in caplog.text
    assert "1 chosen and rejected are the same text" in caplog.text


def test_tie_when_equal_and_pair_ratings(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "sc": 9.0, "sr": 7.0},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "sc": 6.0, "sr": 6.0},
    ]
    spec = pairs_spec(
        write_jsonl(tmp_path / "uf.jsonl", rows),
        prompt="prompt",
        chosen="chosen",
        rejected="rejected",
        tie_when_equal=("sc", "sr"),
        pair_ratings={"overall": ("sc", "sr")},
        scale=(1, 10),
        holdout=0.5,
    )
    examples = read_dataset(spec)
    assert [p.tie for p in examples.pairs] == [False, True]
    assert [(r.id, r.response, r.ratings) for r in examples.ratings] == [
        ("1:chosen", "c1", {"overall": 9.0}),
        ("1:rejected", "r1", {"overall": 7.0}),
        ("2:chosen", "c2", {"overall": 6.0}),
        ("2:rejected", "r2", {"overall": 6.0}),
    ]
    for rating in examples.ratings:  # both sides stay in their pair's split
        assert rating.split == split_of("toy", rating.id.split(":")[0], 0.5)
    too_high = write_jsonl(tmp_path / "hi.jsonl", [*rows, {**rows[0], "sr": 11}])
    with pytest.raises(DataError, match=r"hi.jsonl:3: field 'sr': 11 is outside the scale \[1, 10\]"):
        read_dataset(spec.model_copy(update={"path": str(too_high)}))


def test_objective_and_subset_from_fields(tmp_path):
    rows = [
        {**PAIRS[0], "goal": "helpfulness", "cat": "Pairwise_set/Helpfulness/Code/Documentation"},
        {**PAIRS[1], "goal": "harmlessness", "cat": "Pairwise_set/Harmlessness/S7"},
        {**PAIRS[2], "goal": "helpfulness", "cat": "elsewhere"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    spec = pairs_spec(path, objective="goal", subset="cat", subset_pattern=r"^[^/]+/([^/]+/[^/]+)")
    pairs = read_dataset(spec).pairs
    assert [(p.objective, p.subset) for p in pairs] == [
        ("helpfulness", "Helpfulness/Code"),
        ("harmlessness", "Harmlessness/S7"),
        ("helpfulness", "elsewhere"),
    ]
    assert {p.subset for p in read_dataset(pairs_spec(path, subset_value="toys")).pairs} == {"toys"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**PAIRS[0], "goal": "not an objective"}])
    with pytest.raises(
        DataError, match=r"bad.jsonl:1: field 'goal': objective name 'not an objective' must match"
    ):
        read_dataset(pairs_spec(bad, objective="goal"))


# ---------------------------------------------------------------------------------------------- best-of-N


def test_bon_with_loser_field_and_string_encoded_lists(tmp_path):
    conversation = [{"role": "user", "content": "Write a haiku"}]
    losers = [{"model": "m1", "answer": "bad haiku"}, {"model": "m2", "answer": "worse haiku"}]
    rows = [
        {"uid": "1", "conversation": str(conversation), "best": "good haiku", "losers": str(losers)},
        {"uid": "2", "conversation": json.dumps(conversation), "best": "fine", "losers": json.dumps(losers)},
        {"uid": "3", "conversation": conversation, "best": "bad haiku", "losers": losers},
    ]
    spec = DatasetSpec(
        name="bon",
        path=str(write_jsonl(tmp_path / "bon.jsonl", rows)),
        kind="bon",
        id="uid",
        messages="conversation",
        best="best",
        losers="losers",
        loser_field="answer",
        objective_value="helpfulness",
        holdout=1.0,
    )
    bon = read_dataset(spec).bon
    assert [(b.id, b.prompt, b.best, b.losers, b.split) for b in bon] == [
        ("1", [user("Write a haiku")], "good haiku", ["bad haiku", "worse haiku"], "test"),
        ("2", [user("Write a haiku")], "fine", ["bad haiku", "worse haiku"], "test"),
    ]  # row 3's best is also a loser: skipped
    wrong_key = spec.model_copy(update={"loser_field": "text"})
    with pytest.raises(
        DataError, match=r"bon.jsonl:1: field 'losers': \[0\]: no key 'text' \(there: model, answer\)"
    ):
        read_dataset(wrong_key)


def test_bon_losers_as_plain_strings(tmp_path):
    rows = [{"q": "Pick one", "best": "a", "losers": ["b", "c"]}]
    spec = DatasetSpec(
        name="b",
        path=str(write_jsonl(tmp_path / "b.jsonl", rows)),
        kind="bon",
        prompt="q",
        best="best",
        losers="losers",
    )
    (bon,) = read_dataset(spec).bon
    assert (bon.best, bon.losers, bon.prompt) == ("a", ["b", "c"], [user("Pick one")])


# ---------------------------------------------------------------------------------------------- ratings


def test_ratings_with_missing_values_lists_and_dict_fields(tmp_path):
    rows = [
        {"p": "q1", "r": "a1", "help": 5, "fact": None, "samples": [4, 5, 3]},
        {"p": "q2", "r": "a2", "help": 3, "fact": 2, "samples": [2, None]},
        {"p": "q3", "r": "a3", "help": None, "fact": None, "samples": []},
    ]
    spec = DatasetSpec(
        name="r",
        path=str(write_jsonl(tmp_path / "r.jsonl", rows)),
        kind="ratings",
        prompt="p",
        response="r",
        ratings={"helpfulness": "help", "factuality": "fact", "rubric": {"field": "samples"}},
        scale=(1, 5),
    )
    got = [
        (e.response, e.rating("helpfulness"), e.rating("factuality"), e.rating("rubric"))
        for e in read_dataset(spec).ratings
    ]
    assert got[0][:2] == ("a1", 5.0) and math.isnan(got[0][2]) and got[0][3] == 4.0
    assert got[1] == ("a2", 3.0, 2.0, 2.0)
    assert len(got) == 2  # row 3 rates nothing: skipped
    first = DatasetSpec.model_validate(
        {**spec.model_dump(), "ratings": {"rubric": {"field": "samples", "reduce": "first"}}}
    )
    assert [e.rating("rubric") for e in read_dataset(first).ratings] == [4.0, 2.0]
    text = write_jsonl(tmp_path / "t.jsonl", [*rows[:2], {**rows[0], "help": "good"}])
    with pytest.raises(DataError, match=r"t.jsonl:3: field 'help': expected a number, got 'good'"):
        read_dataset(spec.model_copy(update={"path": str(text)}))


def test_csv_ratings_are_converted_from_text(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('prompt,response,helpfulness\n"Say hi, please",hi,4.5\nSay bye,bye,\n')
    spec = DatasetSpec(
        name="c",
        path=str(path),
        kind="ratings",
        prompt="prompt",
        response="response",
        ratings={"helpfulness": "helpfulness"},
        on_invalid="skip",
    )
    examples = read_dataset(spec).ratings
    assert [(e.prompt, e.response, e.ratings) for e in examples] == [
        ([user("Say hi, please")], "hi", {"helpfulness": 4.5})
    ]
