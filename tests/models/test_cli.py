"""The real `polyreward` command line, run as a subprocess: train → export → score → check-parity."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["export"],
        ["import-armorm"],
        ["check-parity"],
        ["score"],
        ["serve"],
        ["tune"],
        ["rescore"],
        ["eval"],
        ["train"],
        ["train", "objectives"],
    ],
)
def test_help(command, cli):
    out = cli(*command, "--help").stdout
    assert "Usage: polyreward" in out and "--help" in out
    assert "[default: (" not in out  # computed defaults read [default: 512 on CPU, ...], not [default: (...)]


def test_version(cli):
    from polyreward.models import __version__

    assert cli("--version").stdout.strip() == f"polyreward {__version__}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, backbone_dirs, cli, repo):
    """Train heads on the example ratings with the tiny Llama, then export them through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    config, artifact = root / "train.yaml", root / "artifact"
    config.write_text(
        f"backbone: {backbone_dirs['llama']}\n"
        "stage1: {verbosity: false}\n"
        "datasets:\n"
        f"  - {{name: examples, path: {repo / 'examples/ratings.jsonl'}, kind: ratings, holdout: 0,"
        " prompt: prompt, response: response, ratings: ratings}\n"
    )
    train = cli("train", "objectives", "--config", config, "--out", root, "--quiet")
    assert json.loads(train.stdout)["helpfulness"]["n"] == 84
    heads = root / "stage1.safetensors"
    cli(
        "export",
        "--heads",
        heads,
        "--out",
        artifact,
        "--backbone",
        backbone_dirs["llama"],
        "--precision",
        "fp32",
    )
    return artifact


def test_score_writes_one_line_per_input_in_order(pipeline, cli, repo):
    out = cli("score", pipeline, "--input", repo / "examples/items.jsonl").stdout.splitlines()
    ids = [json.loads(line)["id"] for line in (repo / "examples/items.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in out]
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert set(r["rewards"]) == set(r["gating"]) == {"harmlessness", "helpfulness"}
        assert r["tokens"] > 0 and isinstance(r["truncated"], bool)
        assert r["score"] == pytest.approx(
            sum(r["gating"][k] * r["rewards"][k] for k in r["rewards"]), abs=1e-4
        )


def test_check_parity_prints_one_json_object(pipeline, cli):
    report = json.loads(cli("check-parity", pipeline, "--json").stdout)
    assert set(report) == {"fp32"}
    assert report["fp32"]["n"] == 40 and report["fp32"]["pass"] is True
    assert report["fp32"]["max_abs_diff"] <= 1e-4 and report["fp32"]["spearman_score"] >= 0.999


def test_bad_input_fails_with_file_line_and_field(pipeline, tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "yo"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    proc = cli("score", pipeline, "--input", bad, check=False)
    assert proc.returncode == 2
    assert "bad.jsonl:2: messages[0].role: the last message must be the assistant reply" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_artifact_and_overlong_error_mode(pipeline, tmp_path, cli, repo):
    proc = cli("score", tmp_path / "nope", "--input", repo / "examples/items.jsonl", check=False)
    assert proc.returncode == 2 and "manifest.json: not found" in proc.stderr
    strict = tmp_path / "strict"
    heads = pipeline / "heads.safetensors"
    cli(
        "export", "--heads", heads, "--out", strict, "--backbone", load_backbone_id(pipeline),
        "--precision", "fp32", "--max-length", "32", "--truncation", "error",
    )  # fmt: skip
    proc = cli("score", strict, "--input", repo / "examples/items.jsonl", check=False)
    assert proc.returncode == 2
    assert re.search(
        r"items\.jsonl:1: \d+ tokens exceeds max_length 32 and truncation is 'error'", proc.stderr
    )


def load_backbone_id(artifact):
    return json.loads((artifact / "manifest.json").read_text())["backbone"]["id"]


def test_export_default_builds_the_shipped_model(tmp_path, cli, repo):
    from polyreward.models.default import DEFAULT_MODEL

    shipped = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    out = tmp_path / "default"
    cli("export", "--default", "--out", out, "--precision", "fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objectives"] == shipped["objectives"] and manifest["name"] == shipped["name"]
    assert manifest["head"] == shipped["head"] and manifest["head"]["kind"] == "mixture"  # routed by category
    assert manifest["calibration"] == shipped["calibration"]
    assert manifest["graphs"]["fp32"]["outputs"] == shipped["graphs"]["fp32"]["outputs"]
    for key in ("transform", "debiased_calibration", "uncertainty"):  # the reward spaces and intervals
        assert manifest[key] == shipped[key] is not None
    rows = [
        json.loads(line)
        for line in cli("score", out, "--input", repo / "examples/items.jsonl").stdout.splitlines()
    ]
    assert [set(r["rewards"]) for r in rows] == [{o["name"] for o in shipped["objectives"]}] * len(rows)
    for r in rows:  # the router's probabilities and every group's score, by group name
        assert list(r["group_probs"]) == list(r["group_scores"]) == shipped["head"]["groups"]
        assert abs(sum(r["group_probs"].values()) - 1) < 1e-5
    proc = cli(
        "export", "--default", "--heads", out / "heads.safetensors", "--out", tmp_path / "x", check=False
    )
    assert proc.returncode == 2 and "--heads" in proc.stderr
