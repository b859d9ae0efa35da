"""`polyreward import-armorm` on a tiny checkpoint in ArmoRM's layout, against a plain-PyTorch reference of the
official forward pass: through the graph (batched, left and right padded) and through the real server."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from support.armorm_reference import HEADER, K, tiny_armorm
from support.armorm_reference import reference_outputs as reference

from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.builder import NoGatingMarker
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.armorm import ARMORM_OBJECTIVES, CheckpointError, import_armorm
from polyreward.models.torch.export import ExportOptions

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
        {"role": "user", "content": "Tell me a joke about the sea, please."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 6},
    ],
    [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n\nThat adds them."},
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ],
    [
        {"role": "user", "content": "Reward models score responses. " * 9},
        {"role": "assistant", "content": "Yes."},
    ],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_armorm(tmp_path_factory.mktemp("armorm") / "ArmoRM-tiny")


@pytest.fixture(scope="module")
def artifact(checkpoint, cli):
    out = checkpoint.parent / "artifact"
    cli("import-armorm", checkpoint, "--out", out, "--precision", "fp32,fp16")
    return out


@pytest.fixture(scope="module")
def expected(checkpoint):
    return reference(checkpoint, CONVERSATIONS)


def assert_matches(got: dict, want: dict, tol: float = 1e-4):
    for name in ("rewards", "gating", "score"):
        diff = float(np.abs(np.asarray(got[name]) - want[name].numpy()).max())
        assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


def test_manifest_records_armorm_semantics(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [o["name"] for o in manifest["objectives"]] == list(ARMORM_OBJECTIVES) and K == 19
    assert manifest["input"]["gating_marker"] == HEADER
    assert manifest["input"]["padding_side"] == "left"
    assert manifest["input"]["max_length"] == 2048  # the model's context: the official code never truncates
    assert manifest["head"] == {
        "kind": "moe", "gating_temperature": 0.5, "gating_hidden_dim": 32, "gating_n_hidden": 3
    }  # fmt: skip
    assert set(manifest["graphs"]) == {"fp32", "fp16"}


@pytest.mark.parametrize("side", ["left", "right"])
def test_graph_matches_the_reference_batched_and_single(artifact, expected, side):
    scorer = Scorer(artifact, precision="fp32")
    encoded = scorer.tokenize([{"messages": c} for c in CONVERSATIONS])
    assert len({e.tokens for e in encoded}) == len(encoded)  # different lengths: real padding in the batch
    batches = [list(range(len(encoded)))] + [[i] for i in range(len(encoded))]
    for batch in batches:
        feeds = collate(
            [encoded[i] for i in batch], kind="decoder", pad_id=scorer.builder.pad_id, padding_side=side
        )
        out = scorer.forward({n: feeds[n] for n in scorer.input_names})
        for row, i in enumerate(batch):
            assert_matches({k: v[row] for k, v in out.items()}, expected[i])


def test_text_items_and_fp16_agree_with_the_reference(artifact, checkpoint, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    texts = [{"text": tok.apply_chat_template(c, tokenize=False)} for c in CONVERSATIONS]
    for r, want in zip(Scorer(artifact, precision="fp32").score(texts), expected, strict=True):
        assert_matches(r.__dict__, want)
    for r, want in zip(Scorer(artifact, precision="fp16").score(texts), expected, strict=True):
        assert_matches(r.__dict__, want, tol=5e-3)


def test_a_conversation_without_the_assistant_header_is_refused(artifact, checkpoint):
    scorer = Scorer(artifact, precision="fp32")
    with pytest.raises(NoGatingMarker, match=r"items\[1\]: no .*assistant.* in the conversation"):
        scorer.score([{"messages": CONVERSATIONS[0]}, {"text": "User: hi\n\nAssistant: hello"}])
    short = import_armorm(checkpoint, checkpoint.parent / "short", ExportOptions(["fp32"], max_length=16))
    long_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris is nice. " * 8}]
    with pytest.raises(NoGatingMarker, match="left after truncating"):
        Scorer(checkpoint.parent / "short").score([{"messages": long_reply}])
    assert short.input.max_length == 16


def test_serve_returns_the_reference_vector_rewards(artifact, checkpoint, expected, serve, error_of):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    with serve(artifact) as (url, _):
        # the raw space is what ArmoRM's own code returns as `rewards`; the default is the debiased r @ T
        body = {"items": [{"messages": c} for c in CONVERSATIONS], "return": ["gating"], "space": "raw"}
        results = httpx.post(f"{url}/v1/score", json=body, timeout=60).json()["results"]
        t = np.array(json.loads((artifact / "manifest.json").read_text())["transform"])
        default = httpx.post(f"{url}/v1/score", json={"items": body["items"]}, timeout=60).json()["results"]
        for got, plain, want in zip(results, default, expected, strict=True):
            assert len(got["rewards"]) == len(got["gating"]) == 19
            assert_matches(got, want)
            assert np.abs(np.array(plain["rewards"]) - want["rewards"].numpy() @ t).max() <= 1e-4
            assert abs(plain["score"] - float(want["score"])) <= 1e-4
        query = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
        rewards = httpx.post(f"{url}/get_reward", json={"query": query}, timeout=60).json()["rewards"]
        assert np.abs(np.array(rewards) - [float(w["score"]) for w in expected]).max() <= 1e-4
        bad = {"items": [{"messages": CONVERSATIONS[0]}, {"text": "no header here"}]}
        message = error_of(httpx.post(f"{url}/v1/score", json=bad, timeout=60), 422)
        assert message.startswith("items[1]: no '<|eot_id|><|start_header_id|>assistant")
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert models["models"][0]["objectives"] == list(ARMORM_OBJECTIVES)


def test_a_checkpoint_that_does_not_match_its_config_is_refused(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"num_objectives": 18}))
    with pytest.raises(
        CheckpointError, match=r"regression_layer.weight has shape \[19, 64\], expected \[18, 64\]"
    ):
        import_armorm(broken, tmp_path / "out", ExportOptions(["fp32"]))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["gating.logit_scale"]
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'gating\.logit_scale' not found"):
        import_armorm(broken, tmp_path / "out", ExportOptions(["fp32"]))
