"""Rule objectives in the service: learned and rule objectives in one vector, combined by a profile as
docs/rewards.md says; trace stripping before the heads read the reply; labels; rule files that fail at
start-up naming the file, the rule and the field. The app in process on a real artifact, and the real CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from support.recipes import debiased

from polyreward.models.runtime.scorer import Scorer
from polyreward.service.app import create_app
from polyreward.service.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RULES = {
    "strip": {"pattern": r"(?s)<think>.*?</think>\s*"},
    "rules": {
        "format": {"kind": "format", "pattern": r"(?s)^<think>.+</think>\s*\S", "input": "original"},
        "length": {"kind": "length", "min": 3, "max": 12, "tolerance": 10},
        "correct": {"kind": "math"},
    },
}
# A profile mixing one learned objective with the three rule objectives, a floor on correctness.
MIXED = {
    "weights": {"objective0": 1.0, "format": 0.5, "length": 0.25, "correct": 2.0},
    "constraints": {"min": {"correct": 1.0}, "penalty": 3.0},
}
ITEMS = [
    {"prompt": "What is 1/2 + 1/4?", "response": "<think>1/2 = 2/4, plus 1/4 is 3/4</think>\nIt is $\\frac{3}{4}$.",
     "label": "0.75"},
    {"prompt": "What is 1/2 + 1/4?", "response": "It is 2/6, I think, since you add tops and bottoms.", "label": "0.75"},
    {"prompt": "Name a prime.", "response": "<think>2 is prime</think> 2", "label": "2"},
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    (root / "rules.yaml").write_text(yaml.safe_dump(RULES, sort_keys=False))
    (root / "profiles.yaml").write_text(yaml.safe_dump({"default": "mixed", "profiles": {"mixed": MIXED}}))
    return root


@pytest.fixture(scope="module")
def client(minilm_artifact, in_process, files):
    settings = Settings(drain_seconds=0, rules=files / "rules.yaml", profiles=files / "profiles.yaml")
    with in_process(create_app([minilm_artifact], settings)) as c:
        yield c


@pytest.fixture(scope="module")
def offline(minilm_artifact):
    return Scorer(minilm_artifact, precision="fp32", device="cpu")


def direct_rules(item: dict) -> list[float]:
    """The three rules computed by hand for ITEMS (format by Python's re, length by words, correctness known)."""
    reply = re.sub(r"(?s)<think>.*?</think>\s*", "", item["response"])
    n = len(reply.split())
    d = max(3 - n, n - 12, 0)
    correct = {"0.75": "3}{4}" in reply, "2": reply.strip() == "2"}[item["label"]]
    return [
        float(re.search(r"(?s)^<think>.+</think>\s*\S", item["response"]) is not None),
        max(0.0, 1 - d / 10),
        float(correct),
    ]


def test_models_list_rule_objectives_with_their_kind(client):
    (model,) = client.get("/v1/models").json()["models"]
    assert model["objectives"] == ["objective0", "objective1", "objective2", "format", "length", "correct"]
    assert model["kinds"] == {
        "objective0": "learned", "objective1": "learned", "objective2": "learned",
        "format": "format", "length": "length", "correct": "math",
    }  # fmt: skip


def test_a_profile_mixing_learned_and_rule_objectives_gives_the_documented_score(client, offline):
    body = client.post("/v1/score", json={"items": ITEMS}).json()
    assert body["profile"] == "mixed" and body["objectives"][3:] == ["format", "length", "correct"]
    stripped = [{**it, "response": re.sub(r"(?s)<think>.*?</think>\s*", "", it["response"])} for it in ITEMS]
    learned = debiased(offline.manifest, offline.score(stripped))  # the heads read the stripped reply
    rules = np.array([direct_rules(it) for it in ITEMS])
    assert rules.tolist() == [[1, 1, 1], [0, 1, 0], [1, 0.8, 1]]  # the cases cover pass, fail and between
    for row, x, v, it in zip(body["results"], learned, rules, ITEMS, strict=True):
        assert row["rewards"] == pytest.approx([*x, *v], abs=1e-4)
        assert row["raw"]["rewards"][3:] == v.tolist()  # rule values are the same in every space
        want = x[0] + 0.5 * v[0] + 0.25 * v[1] + 2.0 * v[2] - 3.0 * max(0.0, 1.0 - v[2])
        assert row["score"] == pytest.approx(want, abs=1e-4)
        assert row["slack"] == {"correct": pytest.approx(v[2] - 1.0)}
        assert row["stripped_chars"] == len(it["response"]) - len(
            re.sub(r"(?s)<think>.*?</think>\s*", "", it["response"])
        )
        assert "rule_errors" not in row
    assert body["results"][1]["score"] < body["results"][0]["score"]  # the wrong answer pays the penalty


def test_the_gating_mixes_only_learned_objectives(client, offline):
    body = client.post("/v1/score", json={"items": ITEMS[:1], "aggregate": "gating", "weights": None,
                                          "constraints": None}).json()  # fmt: skip
    (row,) = body["results"]
    stripped = {**ITEMS[0], "response": "It is $\\frac{3}{4}$."}
    (want,) = offline.score([stripped])
    assert row["score"] == pytest.approx(want.score, abs=1e-4)  # the graph's own gated score
    assert row["gating"] == pytest.approx([*want.gating, 0, 0, 0], abs=1e-5)


def test_labels_are_required_and_located(client, error_of):
    no_label = {k: v for k, v in ITEMS[1].items() if k != "label"}
    response = client.post("/v1/score", json={"items": [ITEMS[0], no_label]})
    assert error_of(response, 422) == (
        "items[1].label: rule 'correct' compares the reply with a reference answer; this item has none"
    )
    assert response.json()["error"]["type"] == "missing_label"
    reward = client.post("/get_reward", json={"query": ["User: hi\n\nAssistant: yo"] * 2, "labels": ["1"]})
    assert error_of(reward, 422) == "labels: 1 labels for 2 queries"
    reward = client.post("/get_reward", json={"query": ["User: hi\n\nAssistant: yo"], "labels": [None]})
    assert error_of(reward, 422).startswith("labels[0]: rule 'correct' compares the reply")


def test_get_reward_reads_labels_as_reference_answers(client, offline):
    queries = [f"User: {it['prompt']}\n\nAssistant: {it['response']}" for it in ITEMS]  # the plain template
    body = client.post("/get_reward", json={"query": queries, "prompts": [it["prompt"] for it in ITEMS],
                                            "labels": [it["label"] for it in ITEMS]}).json()  # fmt: skip
    via_score = client.post("/v1/score", json={"items": ITEMS}).json()["results"]
    assert body["rewards"] == pytest.approx([r["score"] for r in via_score], abs=1e-4)
    assert body["extra_logs"]["correct"] == [1.0, 0.0, 1.0]
    assert body["extra_logs"]["stripped_chars"] == [float(r["stripped_chars"]) for r in via_score]


def test_compare_pairs_carry_a_label(client):
    pair = {"prompt": "Name a prime.", "chosen": "2", "rejected": "4", "label": "2"}
    (result,) = client.post("/v1/compare", json={"pairs": [pair]}).json()["results"]
    assert result["objectives"]["correct"] == pytest.approx(1 / (1 + np.exp(-1.0)))  # σ(1 − 0)


def test_rule_objectives_are_certain(default_artifact, in_process, files):
    """On a model with uncertainty: a rule objective's σ is 0 and its interval is its value."""
    with in_process(
        create_app([default_artifact], Settings(drain_seconds=0, rules=files / "rules.yaml"))
    ) as c:
        body = c.post("/v1/score", json={"items": ITEMS[:2], "return": ["uncertainty", "intervals"]}).json()
    for row in body["results"]:
        k = len(row["rewards"]) - 3
        assert (
            row["uncertainty"]["epistemic"][k:] == [0, 0, 0] and min(row["uncertainty"]["epistemic"][:k]) > 0
        )
        assert [tuple(b) for b in row["intervals"]["rewards"][k:]] == [(v, v) for v in row["rewards"][k:]]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            {"rules": {"f": {"kind": "format", "pattern": "(?<=x)y"}}},
            r"rules\.f\.format\.pattern: .*RE2 cannot compile",
        ),
        ({"rules": {"l": {"kind": "length", "unit": "chars"}}}, r"rules\.l\.length\.unit: "),
    ],
)
def test_serve_refuses_a_bad_rule_file_before_it_opens_a_port(cli, tmp_path, minilm_artifact, rules, message):
    path = tmp_path / "bad-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    run = cli("serve", str(minilm_artifact), "--rules", str(path), "--port", "9", check=False)
    assert run.returncode != 0
    assert re.search(rf"rules: {re.escape(str(path))}: {message}", run.stderr), run.stderr


def test_serve_refuses_rules_that_shadow_a_learned_objective(serve, tmp_path, minilm_artifact):
    path = tmp_path / "clash.yaml"
    path.write_text(json.dumps({"rules": {"objective1": {"kind": "json"}}}))
    clash = r"rules \['objective1'\] have the names of the model's learned"
    with pytest.raises(AssertionError, match=clash), serve(minilm_artifact, rules=str(path)):
        pass


def test_score_command_applies_the_same_rules_offline(cli, client, minilm_artifact, files, tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({**it, "id": i}) + "\n" for i, it in enumerate(ITEMS)))
    args = ["--rules", files / "rules.yaml", "--profiles", files / "profiles.yaml", "--precision", "fp32"]
    lines = cli("score", minilm_artifact, "--input", data, *args).stdout.splitlines()
    served = client.post("/v1/score", json={"items": ITEMS}).json()["results"]
    for line, want in zip(lines, served, strict=True):
        row = json.loads(line)
        assert row["score"] == pytest.approx(want["score"], abs=1e-4)
        assert list(row["rewards"].values()) == pytest.approx(want["rewards"], abs=1e-4)
        assert row["stripped_chars"] == want["stripped_chars"]
    no_label = tmp_path / "no-label.jsonl"
    no_label.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    run = cli("score", minilm_artifact, "--input", no_label, *args, check=False)
    assert run.returncode != 0 and f"{no_label}:1: label: rule 'correct'" in run.stderr
