"""Data adapters: every file format, every spec option, the error messages, stable splits, and the real sets."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import re
from pathlib import Path

import pytest
import yaml

from models.inputs import Message
from training.data import (
    DataError,
    DatasetSpec,
    load_specs,
    parse_hh,
    read_canonical,
    read_dataset,
    read_records,
    split_of,
    subsplit,
)

PAIRS = [
    {"uid": "a", "q": "What is 2+2?", "good": "4", "bad": "5"},
    {"uid": "b", "q": "Capital of France?", "good": "Paris", "bad": "Lyon"},
    {"uid": "c", "q": "Largest planet?", "good": "Jupiter", "bad": "Mars"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def pairs_spec(path: Path, **options) -> DatasetSpec:
    base = {
        "name": "toy",
        "path": str(path),
        "kind": "pairs",
        "prompt": "q",
        "chosen": "good",
        "rejected": "bad",
    }
    return DatasetSpec(**{**base, **options})


def user(text: str) -> Message:
    return Message(role="user", content=text)


# ---------------------------------------------------------------------------------------------- formats


def _write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows))


def _write_json_object(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps({"version": 2, "rows": rows}))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_csv_gz(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_hf(path: Path, rows: list[dict]) -> None:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def _write_hf_dict(path: Path, rows: list[dict]) -> None:
    import datasets

    other = datasets.Dataset.from_list(rows[:1])
    datasets.DatasetDict({"train": other, "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))


WRITERS = {
    "x.jsonl": write_jsonl,
    "x.jsonl.gz": write_jsonl,
    "x.json": _write_json,
    "obj.json": _write_json_object,
    "x.parquet": _write_parquet,
    "x.csv.gz": _write_csv_gz,
    "hf_dir": _write_hf,
    "hf_dict_dir": _write_hf_dict,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_reads_the_same_pairs(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, PAIRS)
    split = {"hf_split": "test"} if name == "hf_dict_dir" else {}
    examples = read_dataset(pairs_spec(path, id="uid", **split))
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in examples.pairs] == [
        (row["uid"], [user(row["q"])], row["good"], row["bad"]) for row in PAIRS
    ]
    assert {p.dataset for p in examples.pairs} == {"toy"}


def test_records_number_jsonl_lines_and_honour_limit(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (3, {"a": 2}), (4, {"a": 3})]
    assert list(read_records(path, limit=2)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_default_id_is_the_line_number(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS[:2]) + "\n\n" + json.dumps(PAIRS[2]) + "\n")
    assert [p.id for p in read_dataset(pairs_spec(path)).pairs] == ["1", "2", "4"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.txt", b"{}", "x.txt: unknown format"),
        ("x.jsonl", b'{"q": 1}\n{"q": \n', "x.jsonl:2: not valid JSON"),
        ("x.jsonl", b'{"q": 1}\n[1, 2]\n', "x.jsonl:2: expected a JSON object, got list"),
        ("x.jsonl.gz", b"not gzip at all", "x.jsonl.gz: cannot read as jsonl"),
        ("x.json", b'{"a": [], "b": []}', "x.json: expected a JSON array of objects"),
        ("x.parquet", b"not parquet", "x.parquet: cannot read as parquet"),
        ("x.parquet.gz", b"", "x.parquet.gz: gzipped parquet is not supported"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_records(path))


def test_missing_file_names_the_dataset_and_path(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'toy': path: .*nope\.jsonl not found"):
        read_dataset(pairs_spec(tmp_path / "nope.jsonl"))


def test_path_expands_environment_and_resolves_against_base_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "x.jsonl", PAIRS)
    monkeypatch.setenv("POLYREWARD_DATA", str(tmp_path))
    monkeypatch.delenv("POLYREWARD_UNSET", raising=False)
    assert len(read_dataset(pairs_spec("${POLYREWARD_DATA}/x.jsonl")).pairs) == 3
    assert len(read_dataset(pairs_spec("${POLYREWARD_UNSET:-x.jsonl}"), base_dir=tmp_path).pairs) == 3
    with pytest.raises(DataError, match="cfg: path: environment variable POLYREWARD_UNSET is not set"):
        read_dataset(pairs_spec("${POLYREWARD_UNSET}/x.jsonl"), where="cfg")


def test_dotted_paths_reach_into_nested_objects(tmp_path):
    rows = [{"meta": {"id": 7}, "conv": {"q": "Q?", "answers": {"good": "yes", "bad": "no"}}}]
    spec = pairs_spec(
        write_jsonl(tmp_path / "x.jsonl", rows),
        id="meta.id",
        prompt="conv.q",
        chosen="conv.answers.good",
        rejected="conv.answers.bad",
    )
    (pair,) = read_dataset(spec).pairs
    assert (pair.id, pair.prompt, pair.chosen, pair.rejected) == ("7", [user("Q?")], "yes", "no")


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
        ([{**GOOD, "chosn": "c"}], "x.yaml: datasets[0].chosn: Extra inputs are not permitted"),
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


# ---------------------------------------------------------------------------------------------- splits


def test_split_of_is_stable_and_close_to_the_holdout():
    digest = hashlib.sha256(b"rmb:15089").digest()[:8]
    expected = "test" if int.from_bytes(digest, "big") / 2**64 < 0.1 else "train"
    assert split_of("rmb", "15089", 0.1) == expected == split_of("rmb", "15089", 0.1)
    splits = [split_of("ds", str(i), 0.1) for i in range(2000)]
    assert 0.08 < splits.count("test") / 2000 < 0.12
    assert split_of("ds", "7", 0.0) == "train" and split_of("ds", "7", 1.0) == "test"
    assert splits != [split_of("other", str(i), 0.1) for i in range(2000)]  # keyed by dataset too


def test_subsplit_is_stable_and_salted():
    picked = [subsplit(str(i), 0.2, "val") for i in range(2000)]
    assert picked == [subsplit(str(i), 0.2, "val") for i in range(2000)]
    assert 0.17 < sum(picked) / 2000 < 0.23
    assert picked != [subsplit(str(i), 0.2, "other") for i in range(2000)]


def test_group_keeps_rows_of_one_prompt_on_one_side(tmp_path):
    rows = [{"pid": i // 4, "p": f"q{i // 4}", "r": f"a{i}", "s": 3} for i in range(200)]
    spec = DatasetSpec(
        name="g",
        path=str(write_jsonl(tmp_path / "g.jsonl", rows)),
        kind="ratings",
        group="pid",
        prompt="p",
        response="r",
        ratings={"safety": "s"},
        holdout=0.3,
    )
    by_prompt: dict[str, set[str]] = {}
    for example in read_dataset(spec).ratings:
        by_prompt.setdefault(example.prompt[0].content, set()).add(example.split)
    assert all(len(splits) == 1 for splits in by_prompt.values())
    assert {"train", "test"} == set().union(*by_prompt.values())


# ---------------------------------------------------------------------------------------------- canonical files


def test_canonical_pairs(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chosen": "hello",
            "rejected": "go away",
            "tie": False,
            "subset": "chat",
        },
        {
            "messages": [{"role": "user", "content": "yo"}],
            "chosen": "hey",
            "rejected": "hi",
            "tie": True,
            "subset": "chat",
        },
    ]
    examples = read_canonical(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [(p.dataset, p.id, p.prompt, p.tie, p.split, p.subset) for p in examples.pairs] == [
        ("pairs", "1", [user("hi")], False, "test", "chat"),
        ("pairs", "2", [user("yo")], True, "test", "chat"),
    ]
    assert {p.split for p in read_canonical(tmp_path / "pairs.jsonl", split="train").pairs} == {"train"}


def test_canonical_ratings(tmp_path):
    rows = [
        {"id": "x", "prompt": "q", "response": "a", "ratings": {"helpfulness": 4, "harmlessness": None}},
        {"id": "y", "prompt": "q", "response": "b", "ratings": {"helpfulness": 2}},
    ]
    (first, second) = read_canonical(write_jsonl(tmp_path / "ratings.jsonl.gz", rows)).ratings
    assert (first.id, first.dataset, first.response, first.rating("helpfulness")) == (
        "x",
        "ratings",
        "a",
        4.0,
    )
    assert math.isnan(first.rating("harmlessness")) and math.isnan(second.rating("harmlessness"))
    chat = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "ratings": {"helpfulness": 3},
        }
    ]
    (example,) = read_canonical(write_jsonl(tmp_path / "chat.jsonl", chat)).ratings
    assert (example.prompt, example.response, example.split) == ([user("q")], "a", "test")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "ratings": {"bad name": 3}}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'ratings.bad name': objective name 'bad name'"):
        read_canonical(bad)


def test_canonical_bon_and_unknown_shape(tmp_path):
    rows = [{"prompt": "q", "best": "a", "losers": ["b", "c"], "subset": "s"}]
    (bon,) = read_canonical(write_jsonl(tmp_path / "bon.jsonl", rows)).bon
    assert (bon.best, bon.losers, bon.subset, bon.split) == ("a", ["b", "c"], "s", "test")
    with pytest.raises(
        DataError, match=r"odd.jsonl:1: not a canonical file: .*\(fields there: prompt, text\)"
    ):
        read_canonical(write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "q", "text": "t"}]))
    with pytest.raises(DataError, match="needs a 'prompt' or 'messages' field"):
        read_canonical(write_jsonl(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}]))


# ---------------------------------------------------------------------------------------------- the real sets

REAL_SPECS = """
datasets:
  - {name: rmb_pairwise, path: "${POLYREWARD_DATA}/rmb/pairwise.jsonl.gz", kind: pairs, limit: 500,
     id: pair_uid, messages: conversation, chosen: chosen, rejected: rejected, objective: goal,
     subset: category_path, subset_pattern: "^[^/]+/([^/]+/[^/]+)"}
  - {name: rmb_bon, path: "${POLYREWARD_DATA}/rmb/bon.jsonl.gz", kind: bon, limit: 50, holdout: 1.0,
     id: bon_uid, messages: conversation, best: best, losers: losers, loser_field: answer, objective: goal,
     subset: category_path, subset_pattern: "^[^/]+/([^/]+/[^/]+)"}
  - {name: hh_rlhf_harmless_base_test, path: "${POLYREWARD_DATA}/hh_rlhf_harmless_base_test/test.jsonl.gz",
     kind: pairs, holdout: 1.0, hh: true, on_invalid: skip, chosen: chosen, rejected: rejected,
     objective_value: harmlessness}
  - {name: autoj, path: "${POLYREWARD_DATA}/autoj_pairwise_test/testdata_pairwise.jsonl.gz", kind: pairs,
     prompt: prompt, response_a: response 1, response_b: response 2, label: label, label_a: [0], label_b: [1],
     label_tie: [2], subset: scenario}
  - {name: pandalm, path: "${POLYREWARD_DATA}/pandalm_testset/testset.jsonl.gz", kind: pairs, id: idx,
     on_invalid: skip, prompt: [instruction, input], response_a: response1, response_b: response2,
     label: majority_label, label_a: [1], label_b: [2], label_tie: [0], subset: motivation_app}
  - {name: ultrafeedback, path: "${POLYREWARD_DATA}/ultrafeedback_binarized_subset/train.jsonl.gz", kind: pairs,
     id: source_index, prompt: prompt, chosen: chosen, rejected: rejected,
     tie_when_equal: [score_chosen, score_rejected], pair_ratings: {overall: [score_chosen, score_rejected]},
     scale: [1, 10]}
  - {name: just_eval_multi_aspect, path: "${POLYREWARD_DATA}/just_eval_ratings/multi_aspect.jsonl.gz",
     kind: ratings, id: id, prompt: prompt, response: response, scale: [1, 5],
     ratings: {helpfulness: helpfulness, clarity: clarity, factuality: factuality, depth: depth,
               engagement: engagement}}
  - {name: just_eval_safety, path: "${POLYREWARD_DATA}/just_eval_ratings/safety.jsonl.gz", kind: ratings,
     id: [id, generator, judge], group: id, prompt: prompt, response: response, ratings: {safety: safety},
     scale: [1, 5], subset: judge}
  - {name: prometheus, path: "${POLYREWARD_DATA}/prometheus_absolute_gpt4/absolute.jsonl.gz", kind: ratings,
     id: [benchmark, idx, response_source], group: [benchmark, idx], prompt: prompt, response: response,
     ratings: {rubric_score: {field: gpt4_scores, reduce: mean}}, scale: [1, 5], subset: benchmark}
"""

# name -> (ratings, pairs, ties, bon) observed on the published files (their sha256 is in each README)
REAL_COUNTS = {
    "rmb_pairwise": (0, 500, 0, 0),
    "rmb_bon": (0, 0, 0, 50),
    "hh_rlhf_harmless_base_test": (0, 2307, 0, 0),  # 5 rows whose transcripts differ before the last reply
    "autoj": (0, 1296, 317, 0),  # 8 rows with identical responses
    "pandalm": (0, 913, 89, 0),  # 6 rows where a response is a JSON boolean
    "ultrafeedback": (1990, 995, 110, 0),  # 4 rows with chosen == rejected
    "just_eval_multi_aspect": (595, 0, 0, 0),
    "just_eval_safety": (3200, 0, 0, 0),
    "prometheus": (372, 0, 0, 0),
}


@pytest.mark.integration
def test_real_datasets(data_dir, monkeypatch):
    monkeypatch.setenv("POLYREWARD_DATA", str(data_dir))
    specs = load_specs(yaml.safe_load(REAL_SPECS)["datasets"], "REAL_SPECS")
    got = {}
    for spec in specs:
        examples = read_dataset(spec)
        got[spec.name] = examples
        counts = (
            len(examples.ratings),
            len(examples.pairs),
            sum(p.tie for p in examples.pairs),
            len(examples.bon),
        )
        assert counts == REAL_COUNTS[spec.name], spec.name
    rmb = got["rmb_pairwise"].pairs
    assert {p.objective for p in rmb} == {"harmlessness"}  # the file starts with the harmlessness scenarios
    assert {p.subset for p in rmb} == {"Harmlessness/S1", "Harmlessness/S10"}
    assert 0.05 < len(got["rmb_pairwise"].where("test").pairs) / 500 < 0.15
    assert all(len(b.losers) >= 2 and b.split == "test" for b in got["rmb_bon"].bon)
    hh = got["hh_rlhf_harmless_base_test"].pairs
    assert all(p.prompt[0].role == "user" and p.prompt[-1].role == "user" for p in hh)
    assert {p.objective for p in hh} == {"harmlessness"}
    assert any(len(p.prompt) > 1 for p in hh)
    pandalm = got["pandalm"].pairs
    assert any("\n\n" in p.prompt[0].content for p in pandalm)  # instruction + input
    multi = got["just_eval_multi_aspect"].ratings
    assert set(multi[0].ratings) == {"helpfulness", "clarity", "factuality", "depth", "engagement"}
    assert sum(math.isnan(e.rating("factuality")) for e in multi) == 30
    prometheus = got["prometheus"].ratings
    assert all(1 <= e.rating("rubric_score") <= 5 for e in prometheus)
    assert any(e.rating("rubric_score") % 1 for e in prometheus)  # a mean of three samples


def test_sample_keeps_a_stable_hashed_fraction(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": f"x{i}", "q": f"q{i}", "good": "yes", "bad": "no"} for i in range(1000)],
    )
    spec = pairs_spec(path, id="id", sample=0.3)
    first = [p.id for p in read_dataset(spec).pairs]
    assert 250 <= len(first) <= 350
    assert first == [p.id for p in read_dataset(spec).pairs]  # the same rows every time, not a random draw
    assert set(first) < {p.id for p in read_dataset(pairs_spec(path, id="id", sample=0.6)).pairs}
