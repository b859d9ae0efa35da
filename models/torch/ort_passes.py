"""ONNX Runtime's offline passes over an exported fp32 graph: transformer fusion (encoders), per-row
(batch-invariant) int8 quantization and fp16 conversion. The heads, tiny and sensitive, stay in float32 in every derived graph."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger("polyreward.export")

HEAD_NODE_PREFIX = "/heads/"


def fuse(path: Path, config) -> dict[str, int]:
    """ORT transformer fusion for BERT-like encoders (EmbedLayerNormalization, Attention, SkipLayerNormalization,
    BiasGelu); returns fused-op counts.

    Decoders are not run through it: their attention is polyreward's own chunked loop
    (`polyreward.models.torch.attention`), and of the rest only RMSNorm would fuse (SimplifiedLayerNormalization
    and SkipSimplifiedLayerNormalization). ONNX Runtime fuses SimplifiedLayerNormalization itself when the session loads, and the offline optimizer
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
    """int8 whose scores do not depend on the batch: every activation row (token) is quantized with a scale of
    its own, so an item's score is the same alone and inside any batch (ONNX Runtime's dynamic quantization
    picks one scale per tensor, i.e. per batch, and moved a score by up to 0.22 with its neighbours).

    Each backbone MatMul with a constant weight W [K, N] becomes, for x reshaped to rows [M, K]:
    s = max|x_m| / 127 per row; x_q = QuantizeLinear(x, s, 128) (uint8, per axis 0); y = s ⊙
    MatMulIntegerToFloat(x_q, W_q, 1, s_w, 128), with W_q = round(W / s_w) int8 and s_w = max|W_:n| / 127 per
    column. A fused encoder `Attention` becomes the same product for its packed QKV weight, then
    `MultiHeadAttention` (its bias and the 2-D key-padding mask). The heads stay float32.
    """
    t = time.perf_counter()
    model = onnx.load(str(src))
    RowQuantizer(model).run()
    external = src.with_name(src.name + ".data").exists()
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    log.info("int8 per-row (batch-invariant) quantization in %.1fs", time.perf_counter() - t)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization (precision `int8-dynamic`): int8 per-channel weights, one uint8
    activation scale per tensor computed at run time, i.e. per batch. Faster than `quantize_int8` on a CPU,
    but an item's score moves with what it is batched with (0.22 on the default model)."""
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
    log.info("int8 dynamic (per-tensor activation scales) quantization in %.1fs", time.perf_counter() - t)


class RowQuantizer:
    """The graph rewrite behind `quantize_int8`, in place."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.weights = {i.name: i for i in self.graph.initializer}
        self.skip = set(head_nodes(model))
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self.count = 0
        # the mask an encoder's EmbedLayerNormalization turns into the mask index its Attention nodes read
        self.masks = {n.output[1]: n.input[7] for n in self.graph.node if n.op_type == "EmbedLayerNormalization"
                      and len(n.input) > 7 and len(n.output) > 1}  # fmt: skip
        for name, value in (
            ("one", np.float32(1)),
            ("zero", np.float32(0)),
            ("u128", np.float32(128)),
            ("zp", np.uint8(128)),
            ("inv127", np.float32(1 / 127)),
            ("tiny", np.float32(1e-30)),
        ):
            self.const(name, np.array(value))  # fmt: skip

    def const(self, name: str, value: np.ndarray) -> str:
        name = name if name.startswith("rowq/") else f"rowq/{name}"
        self.consts.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str) -> np.ndarray | None:
        tensor = self.weights.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor).astype(np.float32)

    def run(self) -> None:
        for node in self.graph.node:
            w = self.weight(node.input[1]) if len(node.input) > 1 else None
            if node.op_type == "MatMul" and node.name not in self.skip and w is not None and w.ndim == 2:
                self.matmul(node.input[0], w, node.output[0])
            elif node.op_type == "Attention" and w is not None and node.input[3] in self.masks:
                heads = next(a.i for a in node.attribute if a.name == "num_heads")
                qkv = self.matmul(node.input[0], w, None)
                h = w.shape[1] // 3
                q, k, v = (f"{qkv}/{part}" for part in "qkv")
                self.nodes += [
                    helper.make_node("Split", [qkv, self.const(f"{qkv}/split", np.array([h] * 3))], [q, k, v], axis=-1),
                    helper.make_node("MultiHeadAttention", [q, k, v, node.input[2], self.masks[node.input[3]]],
                                     list(node.output), domain="com.microsoft", num_heads=heads),
                ]  # fmt: skip
            else:
                self.nodes.append(node)
        used = {i for n in self.nodes for i in n.input}
        kept = [i for i in self.graph.initializer if i.name in used]
        del self.graph.node[:], self.graph.initializer[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(kept + self.consts)

    def matmul(self, x: str, w: np.ndarray, out: str | None) -> str:
        p = f"rowq/{self.count}"
        self.count += 1
        out = out or f"{p}/y"
        k, n = w.shape
        scale_w = np.maximum(np.abs(w).max(0), 1e-30) / 127
        w_q = np.clip(np.round(w / scale_w), -127, 127).astype(np.int8)
        node = helper.make_node
        if self.opset >= 18:  # axes became an input
            reduce = [node(op, [f"{p}/x", self.const(f"{p}/axes", np.array([1]))], [f"{p}/{op}"], keepdims=0)
                      for op in ("ReduceMax", "ReduceMin")]  # fmt: skip
        else:
            reduce = [
                node(op, [f"{p}/x"], [f"{p}/{op}"], axes=[1], keepdims=0) for op in ("ReduceMax", "ReduceMin")
            ]
        self.nodes += [
            node("Reshape", [x, self.const(f"{p}/rows", np.array([-1, k]))], [f"{p}/x"]),
            *reduce,
            node("Neg", [f"{p}/ReduceMin"], [f"{p}/neg"]),
            node("Max", [f"{p}/ReduceMax", f"{p}/neg", "rowq/tiny"], [f"{p}/amax"]),
            node("Mul", [f"{p}/amax", "rowq/inv127"], [f"{p}/s"]),
            # a zero point per row, as per-axis QuantizeLinear wants: 128 each
            node("Mul", [f"{p}/s", "rowq/zero"], [f"{p}/z0"]),
            node("Add", [f"{p}/z0", "rowq/u128"], [f"{p}/z1"]),
            node("Cast", [f"{p}/z1"], [f"{p}/zp"], to=onnx.TensorProto.UINT8),
            node("QuantizeLinear", [f"{p}/x", f"{p}/s", f"{p}/zp"], [f"{p}/xq"], axis=0),
            node("MatMulIntegerToFloat", [f"{p}/xq", self.const(f"{p}/wq", w_q), "rowq/one",
                 self.const(f"{p}/sw", scale_w.astype(np.float32)), "rowq/zp"], [f"{p}/acc"], domain="com.microsoft"),
            node("Unsqueeze", [f"{p}/s", self.const(f"{p}/col", np.array([1]))], [f"{p}/s1"]),
            node("Mul", [f"{p}/acc", f"{p}/s1"], [f"{p}/y2"]),
            node("Shape", [x], [f"{p}/lead"], start=0, end=-1),
            node("Concat", [f"{p}/lead", self.const(f"{p}/n", np.array([n]))], [f"{p}/shape"], axis=0),
            node("Reshape", [f"{p}/y2", f"{p}/shape"], [out]),
        ]  # fmt: skip
        return out


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
