"""ONNX export against the PyTorch model: parity, batching invariance, fusion, truncation, exporters."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.stats import spearmanr

from polyreward.models.runtime.artifact import HEADS_FILE, load_manifest
from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.torch.export import ExportOptions, export_artifact
from polyreward.models.torch.heads import load_heads
from polyreward.models.torch.ort_passes import quantize_dynamic_int8
from polyreward.models.torch.reward_model import build_reward_model, load_backbone, score_torch

pytestmark = pytest.mark.slow

FAMILIES = ["minilm", "llama", "qwen2"]


def torch_model(backbone_dir, artifact):
    manifest = load_manifest(artifact)
    _, backbone, _ = load_backbone(backbone_dir)
    return build_reward_model(backbone, load_heads(artifact / HEADS_FILE), manifest.backbone.kind)


def alone_reference(model, encoded, pad_id):
    """PyTorch, one item at a time: no padding at all."""
    rows = [score_torch(model, [e], pad_id=pad_id) for e in encoded]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_onnx_matches_pytorch_on_padded_mixed_length_batches(
    family, export_family, backbone_dirs, mixed_items
):
    artifact = export_family(family)
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    model = torch_model(backbone_dirs[family], artifact)
    encoded = scorer.tokenize(mixed_items[:24])
    assert len({e.tokens for e in encoded}) > 10  # genuinely mixed lengths
    want = alone_reference(model, encoded, scorer.builder.pad_id)
    # Encoders must be right-padded (the exporter refuses left); decoders are checked both ways.
    sides = ["right"] if family == "minilm" else ["left", "right"]
    for side in sides:
        arrays = collate(encoded, kind=scorer.builder.kind, pad_id=scorer.builder.pad_id, padding_side=side)
        got = scorer.session.run(scorer.output_names, {n: arrays[n] for n in scorer.input_names})
        for name, g in zip(scorer.output_names, got, strict=True):
            diff = np.abs(g - want[name]).max()
            assert diff <= 1e-4, f"{family} {side}-padded {name}: max abs diff {diff:.3g}"
        # The PyTorch model itself is padding-invariant too (position ids from the mask).
        batched = score_torch(model, encoded, pad_id=scorer.builder.pad_id, padding_side=side)
        assert np.abs(batched["score"] - want["score"]).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_item_alone_equals_item_inside_a_batch_of_64(family, export_family, mixed_items):
    scorer = Scorer(
        export_family(family), precision="fp32", device="cpu", token_budget=10**7, max_batch_items=64
    )
    assert len(scorer.plan(scorer.tokenize(mixed_items))) == 1  # really one batch of 64
    batch = scorer.score(mixed_items)
    for i in (0, 7, 33, 63):
        (alone,) = scorer.score([mixed_items[i]])
        assert abs(alone.score - batch[i].score) <= 1e-5
        assert np.abs(np.array(alone.rewards) - batch[i].rewards).max() <= 1e-5
        assert np.abs(np.array(alone.gating) - batch[i].gating).max() <= 1e-5


def test_fused_minilm_graph_has_fused_attention_and_skip_layernorm(export_family):
    artifact = export_family("minilm")
    manifest = load_manifest(artifact)
    graph = onnx.load(str(artifact / manifest.graphs["fp32"].file), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # Two backbone passes (conversations, then distinct prompts) × 6 layers.
    assert ops.count("Attention") == 12
    assert ops.count("SkipLayerNormalization") == 24
    assert ops.count("EmbedLayerNormalization") == 2
    assert manifest.graphs["fp32"].fused


def test_int8_graph_quantizes_the_backbone_but_not_the_heads(export_family):
    artifact = export_family("minilm")
    graph = onnx.load(str(artifact / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # per-row activation scales: the QKV projection of each of the 12 attention blocks plus its 36 MatMuls
    assert ops.count("MultiHeadAttention") == 12 and ops.count("MatMulIntegerToFloat") == 48
    assert "Attention" not in ops and "DynamicQuantizeLinear" not in ops
    head_ops = {n.op_type for n in graph.node if n.name.startswith("/heads/")}
    assert head_ops and not head_ops & {"MatMulIntegerToFloat", "QuantizeLinear"}


def test_int8_dynamic_is_the_named_per_batch_alternative(export_family, mixed_items, tmp_path):
    """`int8-dynamic` (ORT's dynamic quantization, one activation scale per batch) is still built on request:
    its graph quantizes activations at run time and keeps the ranking of fp32."""
    artifact = export_family("minilm")
    assert ExportOptions(precisions=["int8-dynamic"]).graphs("encoder") == ["fp32", "int8-dynamic"]
    quantize_dynamic_int8(artifact / "model.onnx", tmp_path / "dynamic.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MultiHeadAttention" not in ops
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    feeds = scorer.collate(scorer.tokenize(mixed_items))
    session = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    dynamic = session.run(["score"], dict(feeds))[0]
    assert spearmanr(dynamic, scorer.forward(feeds)["score"])[0] > 0.98


@pytest.mark.parametrize("family", FAMILIES)
def test_overlong_input_is_truncated_and_keeps_the_response_end(family, export_family):
    scorer = Scorer(export_family(family), precision="fp32", device="cpu")
    max_length = scorer.manifest.input.max_length
    response = "Here is my final, careful answer to your question: " + "lorem ipsum " * 20 + "DONE."
    long_item = PromptItem(prompt=" ".join(f"context{i}" for i in range(2 * max_length)), response=response)
    # Extra text at the very start of the prompt is dropped first, so it must not change anything.
    longer_item = PromptItem(prompt="IGNORED PREFIX " * 50 + long_item.prompt, response=response)
    short = scorer.score([PromptItem(prompt="context", response=response)])[0]
    cut, cut2 = scorer.score([long_item, longer_item])
    assert not short.truncated
    assert cut.truncated and cut.tokens == max_length
    assert cut2.score == pytest.approx(cut.score, abs=1e-5)
    full_ids = scorer.builder._tok.encode(
        scorer.builder.split(long_item)[1], add_special_tokens=scorer.builder._add_special
    ).ids
    (enc,) = scorer.tokenize([long_item])
    tail = len(scorer.builder._tok.encode(response, add_special_tokens=False).ids) // 2
    assert enc.input_ids[-tail:] == tuple(full_ids[-tail:])


@pytest.mark.parametrize("family", ["llama", "minilm"])
def test_dynamo_exporter_fallback_matches_pytorch(family, tmp_path, backbone_dirs, mixed_items, random_heads):
    hidden = 64 if family == "llama" else 384
    heads = random_heads(tmp_path / "heads.safetensors", hidden, kind="moe", seed=3)
    out = tmp_path / "artifact"
    options = ExportOptions(precisions=["fp32"], exporter="dynamo", fuse=False, max_length=128)
    export_artifact(backbone_dirs[family], heads, out, options)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    scorer = Scorer(out, precision="fp32", device="cpu")
    encoded = scorer.tokenize(mixed_items[:12])
    want = alone_reference(torch_model(backbone_dirs[family], out), encoded, scorer.builder.pad_id)
    got = scorer.score(mixed_items[:12])
    assert np.abs(np.array([r.score for r in got]) - want["score"]).max() <= 1e-4
    assert np.abs(np.array([r.rewards for r in got]) - want["rewards"]).max() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "minilm"])
def test_fp16_graph_has_float32_heads_and_io_and_ranks_like_fp32(
    family, tmp_path, backbone_dirs, mixed_items, random_heads
):
    heads = random_heads(tmp_path / "heads.safetensors", 64 if family == "llama" else 384, kind="moe")
    export_artifact(
        backbone_dirs[family], heads, tmp_path / "a", ExportOptions(["fp16", "fp32"], max_length=256)
    )
    model = onnx.load(str(tmp_path / "a" / "model.fp16.onnx"))
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert sum(d == onnx.TensorProto.FLOAT16 for d in dtypes.values()) > 10
    assert dtypes["heads.regression.weight"] == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    # The graph must load and score (the CPU provider runs it here; CUDA is where it is fast).
    fp16 = Scorer(tmp_path / "a", precision="fp16", device="cpu").score(mixed_items[:24])
    fp32 = Scorer(tmp_path / "a", precision="fp32", device="cpu").score(mixed_items[:24])
    assert spearmanr([r.score for r in fp16], [r.score for r in fp32]).statistic >= 0.99
    assert np.abs(np.array([r.rewards for r in fp16]) - [r.rewards for r in fp32]).max() <= 5e-2
    if family == "llama":  # fp16 alone: the backbone is loaded and traced in fp16, no fp32 graph is written
        manifest = export_artifact(
            backbone_dirs[family], heads, tmp_path / "b", ExportOptions(["fp16"], max_length=256)
        )
        assert set(manifest.graphs) == {"fp16"} and not (tmp_path / "b" / "model.onnx").exists()
        alone = Scorer(tmp_path / "b", device="cpu").score(mixed_items[:24])
        assert [r.score for r in alone] == pytest.approx([r.score for r in fp16], abs=1e-6)


def test_cuda_request_without_cuda_falls_back_loudly(export_family, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the fallback path cannot be exercised")
    with caplog.at_level("WARNING", logger="polyreward.session"):
        scorer = Scorer(export_family("llama"), precision="fp32", device="cuda")
    assert scorer.fallback and scorer.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider was requested but the session runs on CPUExecutionProvider" in caplog.text


def test_external_data_is_gathered_into_one_aligned_file(export_family, tmp_path):
    """What the TorchScript exporter writes for a graph over 2 GB (one file per tensor) becomes one
    `<graph>.data` file with page-aligned tensors, and the graph computes the same."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from onnx.external_data_helper import _get_all_tensors as all_tensors

    from polyreward.models.torch.trace import gather_external_data

    graph = export_family("llama") / "model.onnx"
    scattered = tmp_path / "scattered"
    scattered.mkdir()
    onnx.save(
        onnx.load(str(graph)), str(scattered / "model.onnx"),
        save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
    )  # fmt: skip
    assert len(list(scattered.iterdir())) > 10
    out = tmp_path / "out"
    out.mkdir()
    gather_external_data(scattered / "model.onnx", out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    tensors = all_tensors(onnx.load(str(out / "model.onnx"), load_external_data=False))
    infos = [ExternalDataInfo(t) for t in tensors if uses_external_data(t)]
    assert infos and all(i.location == "model.onnx.data" and i.offset % 4096 == 0 for i in infos)
    feeds = {
        "input_ids": np.array([[5, 6, 7, 8], [0, 9, 10, 11]], np.int64),
        "attention_mask": np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int64),
        "gating_index": np.array([1, 2], np.int64),
    }
    want = ort.InferenceSession(str(graph)).run(None, feeds)
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    assert not any(
        uses_external_data(t) for t in all_tensors(onnx.load(str(graph), load_external_data=False))
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_int8_keeps_the_ranking_and_does_not_depend_on_the_batch(
    family, backbone_dirs, random_heads, mixed_items, tmp_path
):
    """The per-row int8 pass on a decoder graph (no fused Attention to rewrite: only the MatMuls)."""
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(backbone_dirs[family]).hidden_size
    heads = random_heads(tmp_path / "heads.safetensors", hidden)
    options = ExportOptions(precisions=("fp32", "int8"), max_length=1024, name=f"int8-{family}")
    export_artifact(backbone_dirs[family], heads, tmp_path / "artifact", options)
    items = mixed_items[:48]
    fp32 = [r.score for r in Scorer(tmp_path / "artifact", precision="fp32", device="cpu").score(items)]
    int8 = Scorer(tmp_path / "artifact", precision="int8", device="cpu")
    together = [r.score for r in int8.score(items)]
    assert spearmanr(fp32, together)[0] > 0.99
    alone = [int8.score([it])[0].score for it in items[:8]]
    assert np.abs(np.array(alone) - together[:8]).max() <= 1e-5
    ops = [n.op_type for n in onnx.load(str(tmp_path / "artifact" / "model.int8.onnx")).graph.node]
    assert "MatMulIntegerToFloat" in ops and "DynamicQuantizeLinear" not in ops
