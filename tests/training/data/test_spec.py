"""Dataset specs and row errors: a misspelt option or field fails at once, naming config entry, file, line and field."""

from __future__ import annotations

import logging
import re

import pytest
from support.data import PAIRS, pairs_spec, write_jsonl

from polyreward.training.data import (
    DataError,
    DatasetSpec,
    load_specs,
    read_dataset,
)

# ---------------------------------------------------------------------------------------------- errors


def test_wrong_field_name_fails_naming_option_field_and_file_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", PAIRS)
    with pytest.raises(DataError) as error:
        read_dataset(pairs_spec(path, chosen="chosn"), where="x.yaml datasets[2] (toy)")
    assert str(error.value) == (
        f"x.yaml datasets[2] (toy): chosen: field 'chosn' not found in {path}:1 (fields there: uid, q, good, bad)"
    )


def test_malformed_value_on_line_3_names_line_3(tmp_path):
    rows = [*PAIRS[:2], {**PAIRS[2], "bad": 42}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:3: field 'bad': expected a string, got int$"):
        read_dataset(pairs_spec(path))


def test_missing_field_on_a_later_line_is_named(tmp_path):
    rows = [*PAIRS[:2], {k: v for k, v in PAIRS[2].items() if k != "good"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:3: field 'good': missing$"):
        read_dataset(pairs_spec(path))


def test_on_invalid_skip_counts_malformed_rows(tmp_path, caplog):
    rows = [*PAIRS[:2], {**PAIRS[2], "bad": True}]
    spec = pairs_spec(write_jsonl(tmp_path / "x.jsonl", rows), on_invalid="skip")
    with caplog.at_level(logging.INFO, logger="polyreward.data"):
        assert len(read_dataset(spec).pairs) == 2
    assert "1 invalid field 'bad': expected a string, got bool" in caplog.text


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [PAIRS[0], PAIRS[1], PAIRS[0]])
    with pytest.raises(DataError, match=rf"{path}:3: duplicate id 'a' \(also at {path}:1\)"):
        read_dataset(pairs_spec(path, id="uid"))


def test_messages_field_errors(tmp_path):
    rows = [
        {"conv": [{"role": "user", "content": "hi"}], "good": "a", "bad": "b"},
        {
            "conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
            "good": "a",
            "bad": "b",
        },
    ]
    spec = pairs_spec(write_jsonl(tmp_path / "x.jsonl", rows), prompt=None, messages="conv")
    with pytest.raises(DataError, match=r":2: field 'conv': the last message is an assistant turn"):
        read_dataset(spec)
    spec = pairs_spec(
        write_jsonl(tmp_path / "y.jsonl", [{**rows[0], "conv": "hello"}]), prompt=None, messages="conv"
    )
    with pytest.raises(
        DataError, match=r"y.jsonl:1: field 'conv': expected a list of \{role, content\}, got str"
    ):
        read_dataset(spec)
    bad_role = [{"role": "robot", "content": "hi"}]
    spec = pairs_spec(
        write_jsonl(tmp_path / "z.jsonl", [{**rows[0], "conv": bad_role}]), prompt=None, messages="conv"
    )
    with pytest.raises(
        DataError, match=r"z.jsonl:1: field 'conv': expected a list of \{role, content\}: \[0\].role"
    ):
        read_dataset(spec)


# ---------------------------------------------------------------------------------------------- spec checks


GOOD = {"name": "a", "path": "a.jsonl", "kind": "pairs", "prompt": "q", "chosen": "c", "rejected": "r"}
NO_PATH = {k: v for k, v in GOOD.items() if k != "path"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([GOOD, {**NO_PATH, "name": "b"}], "x.yaml: datasets[1].path: Field required"),
        ([{**GOOD, "chosn": "c"}], "x.yaml: datasets[0].chosn: unknown field; did you mean 'chosen'?"),
        (
            [GOOD, {**GOOD, "name": "b", "chosen": None}],
            "x.yaml: datasets[1]: chosen: required with rejected",
        ),
        ([{**GOOD, "kind": "ratings"}], "x.yaml: datasets[0]: chosen: not an option of kind ratings"),
        ([{**GOOD, "messages": "m"}], "give exactly one of prompt, messages or hh: true"),
        ([{**GOOD, "response_a": "a"}], "give either chosen+rejected or response_a"),
        (
            [{**GOOD, "objective_value": "bad name!"}],
            "objective_value: objective name 'bad name!' must match",
        ),
        ([{**GOOD, "objective": "g", "objective_value": "x"}], "give either objective"),
        ([{**GOOD, "subset_pattern": "("}], "subset_pattern: only with subset"),
        ([{**GOOD, "scale": [1, 5]}], "scale: only with pair_ratings"),
        ([GOOD, GOOD], "x.yaml: datasets[1].name: 'a' is also the name of datasets[0]"),
        ({"name": "a"}, "x.yaml: datasets: Input should be a valid list"),
    ],
)
def test_load_specs_names_source_index_and_field(raw, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_specs(raw, "x.yaml")


def test_load_specs_accepts_a_good_list():
    assert [s.name for s in load_specs([GOOD, {**GOOD, "name": "b"}], "x.yaml")] == ["a", "b"]


def test_spec_checks_for_ab_labels_ratings_and_bon():
    ab = {"name": "a", "path": "p", "kind": "pairs", "prompt": "q", "response_a": "x", "response_b": "y"}
    with pytest.raises(ValueError, match="label: required with response_a, response_b"):
        DatasetSpec(**ab)
    with pytest.raises(ValueError, match="label_b: value '1' is also in label_a"):
        DatasetSpec(**ab, label="l", label_a=[1], label_b=["1"])
    ratings = {"name": "a", "path": "p", "kind": "ratings", "prompt": "q"}
    with pytest.raises(ValueError, match="ratings: required for kind ratings"):
        DatasetSpec(**ratings, response="r")
    with pytest.raises(ValueError, match="response: required for kind ratings"):
        DatasetSpec(**ratings, ratings={"helpfulness": "h"})
    with pytest.raises(ValueError, match="scale: depth not among the objectives helpfulness"):
        DatasetSpec(**ratings, response="r", ratings={"helpfulness": "h"}, scale={"depth": (1, 5)})
    with pytest.raises(ValueError, match="losers: required for kind bon"):
        DatasetSpec(name="a", path="p", kind="bon", prompt="q", best="b")
