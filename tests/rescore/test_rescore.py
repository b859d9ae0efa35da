"""`polyreward rescore` end to end: formats, a kill -9 half way and --resume, remote vs local, bad inputs."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from polyreward.rescore.run import RUN_FILE, read_output

pytestmark = pytest.mark.slow

PAIRS = ["--kind", "pairs", "--map", "prompt=question", "--map", "chosen=good", "--map", "rejected=bad",
         "--map", "id=uid", "--map", "subset=topic"]  # fmt: skip


def pair_rows(n: int) -> list[dict]:
    """Synthetic preference rows with real text of different lengths (the packaged parity sample)."""
    from polyreward.models.runtime.items import TextItem, sample_items

    texts = [it.text if isinstance(it, TextItem) else it.as_messages()[-1].content for it in sample_items()]
    return [
        {
            "uid": f"p{i}",
            "topic": ["math", "code", "chat"][i % 3],
            "question": f"Question {i}: {texts[i % len(texts)][:80]}",
            "good": texts[(i * 7) % len(texts)][: 40 + 7 * (i % 20)],
            "bad": f"No. {i}",
        }
        for i in range(n)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reference(minilm_artifact, tmp_path_factory, cli):
    """An uninterrupted run over 96 rows, in 6 shards."""
    root = tmp_path_factory.mktemp("rescore")
    data = write_jsonl(root / "pairs.jsonl", pair_rows(96))
    cli(
        "rescore",
        data,
        "--out",
        root / "ref",
        "--artifact",
        minilm_artifact,
        *PAIRS,
        "--shard-rows",
        16,
        "--quiet",
    )
    return data, read_output(root / "ref").to_pylist()


def by_uid(rows):
    return {r["uid"]: r for r in rows}


def assert_same_values(got: list[dict], want: list[dict], tol: float = 0.0):
    assert sorted(r["uid"] for r in got) == sorted(r["uid"] for r in want)
    want_by = by_uid(want)
    for r in got:
        w = want_by[r["uid"]]
        for side in ("chosen", "rejected"):
            assert abs(r[f"{side}_score"] - w[f"{side}_score"]) <= tol
            diffs = [abs(r[f"{side}_rewards"][k] - v) for k, v in w[f"{side}_rewards"].items()]
            assert max(diffs) <= tol


def test_output_has_the_input_rows_vector_rewards_and_a_summary(reference, minilm_artifact, tmp_path):
    data, rows = reference
    assert [r["row"] for r in rows] == list(range(96))
    first = rows[0]
    assert first["uid"] == "p0" and first["question"].startswith("Question 0")  # the input row, carried
    assert first["margin"] == pytest.approx(first["chosen_score"] - first["rejected_score"])
    assert first["p_chosen"] == pytest.approx(1 / (1 + np.exp(-first["margin"])))
    assert first["agrees"] == (first["margin"] > 0)
    assert set(first["chosen_rewards"]) == set(first["chosen_gating"]) and len(first["chosen_rewards"]) == 3
    # The values are the offline scorer's.
    from polyreward.models.runtime.scorer import Scorer

    got = Scorer(minilm_artifact).score([{"prompt": first["question"], "response": first["good"]}])[0]
    assert first["chosen_score"] == pytest.approx(got.score, abs=1e-5)
    summary = json.loads((data.parent / "ref" / "summary.json").read_text())
    assert summary["rows"] == 96 and summary["pairs"]["n"] == 96
    assert summary["pairs"]["accuracy"] == pytest.approx(np.mean([r["agrees"] for r in rows]))
    assert set(summary["pairs"]["per_subset"]) == {"math", "code", "chat"}
    assert (data.parent / "ref" / "margins.png").stat().st_size > 1000


def test_a_run_killed_half_way_resumes_to_exactly_the_uninterrupted_output(
    reference, minilm_artifact, tmp_path, cli, polyreward_bin
):
    data, want = reference
    out = tmp_path / "run"
    args = [
        "rescore",
        data,
        "--out",
        out,
        "--artifact",
        minilm_artifact,
        *PAIRS,
        "--shard-rows",
        16,
        "--quiet",
    ]
    proc = subprocess.Popen(
        [polyreward_bin, *map(str, args)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run = out / RUN_FILE
        if run.exists() and len(json.loads(run.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    manifest = json.loads((out / RUN_FILE).read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < 6, manifest["shards"]
    again = cli(*args, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently appends or restarts
    cli(*args, "--resume")
    got = read_output(out).to_pylist()
    assert [r["row"] for r in got] == list(range(96))  # one row per input row, in order
    assert_same_values(got, want)  # bit-identical: the same shards, the same batches


def test_input_formats_give_the_same_values(reference, minilm_artifact, tmp_path, cli):
    import datasets

    data, want = reference
    rows = [json.loads(line) for line in data.read_text().splitlines()][:20]
    inputs = {
        "jsonl.gz": tmp_path / "p.jsonl.gz",
        "parquet": tmp_path / "p.parquet",
        "csv": tmp_path / "p.csv",
        "json": tmp_path / "p.json",
        "hf": tmp_path / "hf",
    }
    with gzip.open(inputs["jsonl.gz"], "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), inputs["parquet"])
    pacsv.write_csv(pa.Table.from_pylist(rows), inputs["csv"])
    inputs["json"].write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(inputs["hf"]))
    for fmt, path in inputs.items():
        out = tmp_path / f"out-{fmt}"
        cli(
            "rescore",
            path,
            "--out",
            out,
            "--artifact",
            minilm_artifact,
            *PAIRS,
            "--format",
            "jsonl",
            "--quiet",
        )
        assert_same_values(read_output(out), want[:20], tol=1e-5)


def test_remote_engine_matches_local(reference, minilm_artifact, tmp_path, cli, serve):
    data, want = reference
    with serve(minilm_artifact) as (url, _):
        cli(
            "rescore", data, "--out", tmp_path / "remote", "--url", url, *PAIRS, "--concurrency", 3, "--quiet"
        )
    assert_same_values(read_output(tmp_path / "remote").to_pylist(), want, tol=1e-4)


def test_bad_inputs_fail_before_scoring_naming_file_and_column(reference, minilm_artifact, tmp_path, cli):
    data, _ = reference
    mixed = write_jsonl(
        tmp_path / "second.jsonl", [{k: v for k, v in r.items() if k != "bad"} for r in pair_rows(3)]
    )
    (tmp_path / "broken.jsonl").write_text(json.dumps(pair_rows(1)[0]) + "\n{oops\n")
    cases = {
        "missing column": ([data, mixed], r"second\.jsonl.*'bad'"),
        "unreadable file": ([tmp_path / "nope.jsonl"], r"nope\.jsonl: no such file"),
        "column absent": (
            [write_jsonl(tmp_path / "other.jsonl", [{"uid": 1}])],
            r"other\.jsonl.*'question' not found",
        ),
        "not json": ([tmp_path / "broken.jsonl"], r"broken\.jsonl:2: not valid JSON"),
    }
    for case, (inputs, message) in cases.items():
        out = tmp_path / case.replace(" ", "-")
        proc = cli("rescore", *inputs, "--out", out, "--artifact", minilm_artifact, *PAIRS, check=False)
        assert proc.returncode == 2, (case, proc.stderr)
        assert re.search(message, proc.stderr), (case, proc.stderr)
        assert not out.exists() or not any(out.iterdir()), case  # nothing written: fix and rerun as is
    # Resuming after the input changed is refused, naming the file.
    changed = write_jsonl(tmp_path / "changing.jsonl", pair_rows(8))
    args = ["rescore", changed, "--out", tmp_path / "c", "--artifact", minilm_artifact, *PAIRS, "--quiet"]
    cli(*args)
    write_jsonl(changed, pair_rows(9))
    proc = cli(*args, "--resume", check=False)
    assert proc.returncode == 2 and "changing.jsonl: changed" in proc.stderr


def test_ray_engine_matches_local(reference, minilm_artifact, tmp_path):
    """Ray Data with an actor pool of two Scorers on a local `ray.init(num_cpus=2)`."""
    ray = pytest.importorskip("ray")
    from polyreward.rescore.cli import build_spec
    from polyreward.rescore.engines import RayEngine
    from polyreward.rescore.run import Run

    data, want = reference
    spec = build_spec([data], "pairs", PAIRS[3::2], None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        Run([data], spec, tmp_path / "ray", RayEngine(minilm_artifact, actors=2), shard_rows=16).run(
            progress=False
        )
    finally:
        ray.shutdown()
    got = read_output(tmp_path / "ray").to_pylist()
    assert [r["row"] for r in got] == list(range(96))
    assert_same_values(got, want, tol=1e-4)


def test_unlabelled_responses_and_hh_transcripts(minilm_artifact, tmp_path, cli):
    from polyreward.models.runtime.scorer import Scorer

    rows = [{"q": f"Question {i}?", "a": "Answer. " * (i + 1)} for i in range(5)]
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    args = ["--kind", "responses", "--map", "prompt=q", "--map", "response=a", "--quiet"]
    cli("rescore", data, "--out", tmp_path / "r", "--artifact", minilm_artifact, *args)
    got = [r["response_score"] for r in read_output(tmp_path / "r").to_pylist()]
    want = Scorer(minilm_artifact).score([{"prompt": r["q"], "response": r["a"]} for r in rows])
    assert got == pytest.approx([w.score for w in want], abs=1e-5)

    hh = [
        {
            "chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello, how can I help?",
            "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go away.",
        }
        for i in range(4)
    ]
    same = "\n\nHuman: Hi\n\nAssistant: Same."
    data = write_jsonl(tmp_path / "hh.jsonl", [*hh, {"chosen": same, "rejected": same}])
    args = ["--kind", "pairs", "--map", "hh=true", "--map", "chosen=chosen", "--map", "rejected=rejected"]
    summary = json.loads(
        cli("rescore", data, "--out", tmp_path / "hh", "--artifact", minilm_artifact, *args).stdout
    )
    out = read_output(tmp_path / "hh").to_pylist()
    polite = Scorer(minilm_artifact).score([{"prompt": "Hi 0", "response": "Hello, how can I help?"}])[0]
    assert out[0]["chosen_score"] == pytest.approx(polite.score, abs=1e-5)
    assert summary["pairs"]["n"] == 4 and summary["skipped"] == {"chosen and rejected are the same text": 1}


def test_rule_objectives_join_the_rewards(reference, minilm_artifact, tmp_path, cli):
    """--rules: each side's rewards gain the rule objectives (values as the rules define them), the learned ones
    unchanged; a resumed run must use the same rule file."""
    data, rows = reference
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  short: {kind: length, max: 5, tolerance: 20}\n  digit: {kind: format, pattern: '[0-9]'}\n"
    )
    out = tmp_path / "rules-run"
    cli("rescore", data, "--out", out, "--artifact", minilm_artifact, *PAIRS, "--rules", rules, "--quiet")
    got = read_output(out).to_pylist()
    for r, w in zip(got, rows, strict=True):
        for side, text in (("chosen", r["good"]), ("rejected", r["bad"])):
            n = len(text.split())
            assert r[f"{side}_rewards"]["short"] == pytest.approx(max(0.0, 1 - max(0, n - 5) / 20))
            assert r[f"{side}_rewards"]["digit"] == float(re.search("[0-9]", text) is not None)
            learned = {k: v for k, v in r[f"{side}_rewards"].items() if k not in ("short", "digit")}
            assert learned == pytest.approx(w[f"{side}_rewards"], abs=1e-5)
            assert r[f"{side}_score"] == pytest.approx(
                w[f"{side}_score"], abs=1e-5
            )  # the gating ignores rules
    remote = cli(
        "rescore", data, "--out", tmp_path / "x", "--url", "http://127.0.0.1:9", "--rules", rules, check=False
    )
    assert (
        remote.returncode != 0 and "local engine only; remote: the server's (serve --rules)" in remote.stderr
    )
