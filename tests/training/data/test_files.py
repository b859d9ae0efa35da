"""Reading rows: every file format gives the same rows; unreadable files and paths name the file."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from support.data import PAIRS, pairs_spec, user, write_jsonl

from polyreward.training.data import (
    DataError,
    read_dataset,
    read_records,
)

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
