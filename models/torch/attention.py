"""Decoder attention as one operator, and its lowering to an ONNX graph whose memory grows linearly with length.

transformers' eager attention builds a [batch, 1, seq, seq] mask and then [batch, heads, seq, seq] scores per
layer; exported as it is, every batch materialises them (a 16k-token item: 32 heads x 16k^2 x 4 bytes = 34 GB
for one layer's scores). ONNX Runtime 1.32's fused kernels do not avoid it on a CPU either: its CPU
`GroupQueryAttention` allocates [B, N, S, T] probabilities and `MultiHeadAttention`'s flash path excludes
causal masks (both read in its sources), and the opset-23 `Attention` op took 2.4 GB for 8 heads at 8k tokens
(measured: N S^2 4 bytes).

So decoders load with `IMPLEMENTATION`, an attention function registered with transformers (its mask function
passes the 2-D padding mask through, like flash attention's, so no 4-D mask is built either). In PyTorch it
is exact attention (`reference`: rotary embeddings are applied by the model before it, as always; causal,
padding, the family's sliding window and logit soft-capping; softmax in float32, as eager does). Traced, each
layer's attention is one node, `polyreward::Attention(q, k, v, mask)`, which `lower` replaces by an ONNX Loop
over query chunks of `CHUNK` tokens: each chunk's scores are [B, H, CHUNK, keys] against only the keys it may
see (causal: none after the chunk; sliding window: none before it), so memory grows linearly with the length
and the causal upper triangle is never computed.
"""

from __future__ import annotations

import torch
from onnx import TensorProto, helper

IMPLEMENTATION = "polyreward"
DOMAIN = "polyreward"
CHUNK = 256  # query tokens per loop iteration: scores [B, H, 256, keys] at a time
_MASKED = -65504.0  # the masked score (fp16's lowest, so the same graph value works in fp16 and fp32)


def _allowed(
    mask: torch.Tensor | None, q_len: int, k_len: int, window: int, device
) -> torch.Tensor:  # [B or 1, 1, S, T] bool
    q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    k = torch.arange(k_len, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    return allowed if mask is None else allowed & mask[:, None, None, -k_len:].bool()


def reference(q, k, v, mask, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Exact causal attention [B, H, S, D] of q [B, H, S, D] over k, v [B, KV, S, D] with a 2-D mask [B, S]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_allowed(mask, q.shape[2], k.shape[2], window, q.device), _MASKED)
    return torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)


class _Attention(torch.autograd.Function):
    """`reference` in PyTorch; one `polyreward::Attention` node when traced for ONNX."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, window: int, softcap: float):
        return reference(q, k, v, mask, scale, window, softcap)

    @staticmethod
    def symbolic(g, q, k, v, mask, scale: float, window: int, softcap: float):
        half = q.type().scalarType() == "Half"
        return g.op(
            f"{DOMAIN}::Attention",
            q,
            k,
            v,
            mask,
            scale_f=scale,
            window_i=window,
            softcap_f=softcap,
            half_i=half,
        ).setType(q.type())


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: (output [B, S, H, D], no weights). Dropout is not applied:
    reward models score in eval mode."""
    scale = float(scaling if scaling is not None else module.head_dim**-0.5)
    window = int(kwargs.get("sliding_window") or 0)
    softcap = float(kwargs.get("softcap") or 0.0)
    if attention_mask is None:
        attention_mask = torch.ones(query.shape[0], key.shape[2], dtype=torch.bool, device=query.device)
    if torch.jit.is_tracing():
        out = _Attention.apply(query, key, value, attention_mask, scale, window, softcap)
    else:
        out = reference(query, key, value, attention_mask, scale, window, softcap)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function for `IMPLEMENTATION`: the 2-D padding mask itself (no 4-D mask is built)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register() -> str:
    """Register `IMPLEMENTATION` with transformers (idempotent); returns its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, padding_mask)
    return IMPLEMENTATION


# -- the ONNX lowering ----------------------------------------------------------------------------------


def lower(model, chunk: int = CHUNK) -> int:
    """Replace every `polyreward::Attention` node of `model` (an onnx.ModelProto, in place) by its chunked
    Loop; returns how many were lowered."""
    graph, count = model.graph, 0
    for index, node in reversed(list(enumerate(graph.node))):
        if node.domain == DOMAIN and node.op_type == "Attention":
            graph.node.remove(node)
            for offset, new in enumerate(_loop(node, f"/attention{index}", chunk)):
                graph.node.insert(index + offset, new)
            count += 1
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return count


class _Nodes(list):
    """ONNX nodes under construction, each named `<prefix>/<label>` (its one output has the same name)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def __call__(self, kind: str, inputs: list[str], label: str, **attrs) -> str:
        name = f"{self.prefix}/{label}"
        self.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def part(self, shape: str, start: int, stop: int, label: str) -> str:
        """shape[start:stop] of a 1-D shape tensor."""
        bounds = [self.const(f"{label}_{end}", [i]) for end, i in (("start", start), ("stop", stop))]
        return self("Slice", [shape, *bounds], label)

    def const(self, label: str, value, dtype: int = TensorProto.INT64) -> str:
        """A constant: a list is 1-D, anything else a scalar."""
        values = value if isinstance(value, list) else [value]
        dims = [len(values)] if isinstance(value, list) else []
        return self("Constant", [], label, value=helper.make_tensor(label, dtype, dims, values))


def _loop(node, name: str, chunk: int) -> list:
    """The nodes that compute `node` (see the module docstring), its output named as before."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scale, window, softcap = attrs["scale"], attrs["window"], attrs["softcap"]
    dtype = TensorProto.FLOAT16 if attrs["half"] else TensorProto.FLOAT
    q, k, v, mask = node.input
    op = _Nodes(name)
    two, zero, one, size = (
        op.const("two", [2]),
        op.const("zero", 0),
        op.const("one", 1),
        op.const("chunk", chunk),
    )
    length = op("Squeeze", [op("Gather", [op("Shape", [q], "q_shape"), two], "length_1d")], "length")
    up = op("Add", [length, op.const("chunk_less_1", chunk - 1)], "length_up")
    trips = op("Div", [up, size], "trips")
    # GQA: every query head's keys and values, [B, H, S, D] (linear in S)
    q_shape, k_shape = op("Shape", [q], "q_shape_all"), op("Shape", [k], "k_shape")
    heads, kv_heads = op.part(q_shape, 1, 2, "heads"), op.part(k_shape, 1, 2, "kv_heads")
    groups = op("Div", [heads, kv_heads], "groups")
    expand = op(
        "Concat",
        [op.part(k_shape, 0, 2, "b_kv"), groups, op.part(k_shape, 2, 4, "s_d")],
        "expand_shape",
        axis=0,
    )
    flat = op(
        "Concat",
        [op.const("keep", [0]), heads, op.const("rest", [-1]), op.part(k_shape, 3, 4, "d")],
        "flat",
        axis=0,
    )
    k_all = op(
        "Reshape", [op("Expand", [op("Unsqueeze", [k, two], "k5"), expand], "k_expanded"), flat], "k_all"
    )
    v_all = op(
        "Reshape", [op("Expand", [op("Unsqueeze", [v, two], "v5"), expand], "v_expanded"), flat], "v_all"
    )
    # queries padded to a whole number of chunks
    pad_len = op(
        "Unsqueeze",
        [op("Sub", [op("Mul", [trips, size], "padded"), length], "pad"), op.const("ax0", [0])],
        "pad_1d",
    )
    pads = op("Concat", [op.const("pads_head", [0] * 6), pad_len, op.const("pads_tail", [0])], "pads", axis=0)
    q_pad = op("Pad", [q, pads], "q_pad")
    keep_keys = op(
        "Unsqueeze",
        [op("Cast", [mask], "mask_bool", to=TensorProto.BOOL), op.const("ax12", [1, 2])],
        "keep_keys",
    )

    # the body: chunk i's queries [i*C, (i+1)*C) against keys [max(0, i*C - window + 1), min((i+1)*C, S))
    it = _Nodes(f"{name}/body")
    i, cond_in = f"{name}/body/i", f"{name}/body/cond_in"
    axis2, axis3, axis0 = it.const("axis2", [2]), it.const("axis3", [3]), it.const("axis0", [0])
    start = it("Mul", [i, size], "start")
    stop = it("Add", [start, size], "stop")
    key_stop = it("Min", [stop, length], "key_stop")
    key_start = zero
    if window:
        key_start = it(
            "Max",
            [it("Sub", [start, it.const("window_less_1", window - 1)], "window_start"), zero],
            "key_start",
        )
    one_d = lambda x, label: it("Unsqueeze", [x, axis0], label)  # noqa: E731
    s1, e1 = one_d(start, "start_1d"), one_d(stop, "stop_1d")
    ks1, ke1 = one_d(key_start, "key_start_1d"), one_d(key_stop, "key_stop_1d")
    q_i = it("Slice", [q_pad, s1, e1, axis2], "q")
    k_i = it("Slice", [k_all, ks1, ke1, axis2], "k")
    v_i = it("Slice", [v_all, ks1, ke1, axis2], "v")
    qk = it("MatMul", [q_i, it("Transpose", [k_i], "k_t", perm=[0, 1, 3, 2])], "qk")
    scores = it(
        "Mul",
        [it("Cast", [qk], "qk_f32", to=TensorProto.FLOAT), it.const("scale", scale, TensorProto.FLOAT)],
        "scores",
    )
    if softcap:
        cap = it.const("softcap", softcap, TensorProto.FLOAT)
        scores = it(
            "Mul", [it("Tanh", [it("Div", [scores, cap], "capped_in")], "capped"), cap], "scores_capped"
        )
    q_pos = it("Unsqueeze", [it("Range", [start, stop, one], "q_pos_1d"), it.const("ax1", [1])], "q_pos")
    k_pos = it("Unsqueeze", [it("Range", [key_start, key_stop, one], "k_pos_1d"), axis0], "k_pos")
    allowed = it("LessOrEqual", [k_pos, q_pos], "causal")
    if window:
        low = it("Sub", [q_pos, it.const("window", window)], "window_low")
        allowed = it("And", [allowed, it("Greater", [k_pos, low], "in_window")], "causal_window")
    allowed_4d = it("Unsqueeze", [allowed, it.const("ax01", [0, 1])], "allowed_4d")
    allowed = it("And", [allowed_4d, it("Slice", [keep_keys, ks1, ke1, axis3], "keep_i")], "allowed")
    scores = it("Where", [allowed, scores, it.const("masked", _MASKED, TensorProto.FLOAT)], "masked_scores")
    probs = it("CastLike", [it("Softmax", [scores], "probs_f32", axis=-1), q], "probs")
    out = it("MatMul", [probs, v_i], "out")
    cond_out = it("Identity", [cond_in], "cond_out")
    body = helper.make_graph(
        list(it), f"{name}/body",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info(out, dtype, None)],
    )  # fmt: skip
    chunks = op("Loop", [trips, op.const("true", 1, TensorProto.BOOL)], "chunks", body=body)
    # [n, B, H, C, D] -> [B, H, n*C, D] -> its first S positions
    joined = op("Reshape", [op("Transpose", [chunks], "chunks_t", perm=[1, 2, 0, 3, 4]), flat], "joined")
    length_1d = op("Unsqueeze", [length, op.const("ax0b", [0])], "length_1d_out")
    op.append(
        helper.make_node("Slice", [joined, op.const("zero_1d", [0]), length_1d, two], list(node.output))
    )
    return list(op)
