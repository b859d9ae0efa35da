"""Whole datasets: stable splits, canonical files without a config, and the real sets in ../shared/data."""

from __future__ import annotations

import hashlib
import math

import pytest
import yaml
from support.data import pairs_spec, user, write_jsonl

from polyreward.training.data import (
    DataError,
    DatasetSpec,
    load_specs,
    read_canonical,
    read_dataset,
    split_of,
    subsplit,
)

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
