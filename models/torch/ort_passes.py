"""ONNX Runtime's offline passes over an exported fp32 graph: transformer fusion (encoders), dynamic int8
quantization and fp16 conversion. The heads, tiny and sensitive, stay in float32 in every derived graph."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import onnx

log = logging.getLogger("polyreward.export")

HEAD_NODE_PREFIX = "/heads/"


def fuse(path: Path, config) -> dict[str, int]:
    """ORT transformer fusion for BERT-like encoders (EmbedLayerNormalization, Attention, SkipLayerNormalization,
    BiasGelu); returns fused-op counts.

    Decoders are not run through it. On Llama and Qwen2 only RMSNorm fuses (SimplifiedLayerNormalization and
    SkipSimplifiedLayerNormalization); attention and rotary embeddings do not fuse from the TorchScript graph.
    ONNX Runtime fuses SimplifiedLayerNormalization itself when the session loads, and the offline optimizer
    held about 10x the weights in memory (measured: over 14 GB for a 1.3 GB fp16 graph), so it is skipped.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
    counts = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if not counts.get("Attention"):
        log.warning("transformer fusion found no Attention pattern in %s; the graph runs unfused", path.name)
    opt.save_model_to_file(str(path))
    log.info("fused %s in %.1fs: %s", path.name, time.perf_counter() - t, counts)
    return counts


def head_nodes(model: onnx.ModelProto) -> list[str]:
    names = [n.name for n in model.graph.node if n.name.startswith(HEAD_NODE_PREFIX)]
    # The quantizer rewrites Gemm into `<name>_MatMul` + Add before it reads the exclusion list.
    return names + [f"{n}_MatMul" for n in names]


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t = time.perf_counter()
    root = logging.getLogger()  # the quantizer logs advice meant for its own examples on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
            nodes_to_exclude=head_nodes(onnx.load(str(src), load_external_data=False)),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=src.with_name(src.name + ".data").exists(),
        )  # fmt: skip
    finally:
        root.setLevel(level)
    log.info("int8 per-channel dynamic quantization in %.1fs", time.perf_counter() - t)


def convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    # Symbolic shape inference types every intermediate tensor, so Casts land around the fp32 head nodes
    # (without it the converter leaves an fp16 input on the fp32 regression Gemm and the graph will not load).
    model.convert_float_to_float16(
        keep_io_types=True, use_symbolic_shape_infer=True, node_block_list=head_nodes(model.model)
    )
    model.save_model_to_file(str(dst))
    log.info("fp16 graph written (inputs and outputs stay int64 / float32, heads float32)")
