"""polyreward's decoder attention: the traced node, lowered to its chunked loop, run by ONNX Runtime, against
a direct computation of masked causal attention (and `reference`, the PyTorch side, against the same)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from polyreward.models.torch import attention

H, KV, D, S = 4, 2, 8, 13  # 13 tokens: not a whole number of chunks


class OneLayer(torch.nn.Module):
    def __init__(self, window: int, softcap: float):
        super().__init__()
        self.window, self.softcap = window, softcap

    def forward(self, q, k, v, mask):
        return attention._Attention.apply(q, k, v, mask.bool(), 0.3, self.window, self.softcap)


def direct(q, k, v, mask, scale, window, softcap) -> np.ndarray:
    """Masked causal attention, one query at a time, in float64 (rows with no visible key: uniform)."""
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(H):
            kv = h // (H // KV)
            for i in range(S):
                visible = [j for j in range(S) if j <= i and (not window or j > i - window) and mask[b, j]]
                if not visible:
                    out[b, h, i] = v[b, kv].mean(0)
                    continue
                s = np.array([scale * q[b, h, i] @ k[b, kv, j] for j in visible], np.float64)
                if softcap:
                    s = np.tanh(s / softcap) * softcap
                p = np.exp(s - s.max())
                out[b, h, i] = (p / p.sum()) @ v[b, kv, visible]
    return out


@pytest.mark.parametrize(
    ("window", "softcap", "chunk"), [(0, 0.0, 4), (5, 0.0, 4), (0, 3.0, 5), (6, 2.0, 16)]
)
def test_the_lowered_loop_is_masked_causal_attention(tmp_path, window, softcap, chunk):
    rng = np.random.default_rng(window + chunk)
    q = rng.standard_normal((3, H, S, D)).astype(np.float32) * 2
    k = rng.standard_normal((3, KV, S, D)).astype(np.float32) * 2
    v = rng.standard_normal((3, KV, S, D)).astype(np.float32)
    mask = np.ones((3, S), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    args = tuple(torch.from_numpy(a) for a in (q, k, v, mask))
    path = tmp_path / "attention.onnx"
    torch.onnx.export(
        OneLayer(window, softcap), args, str(path), dynamo=False, opset_version=17,
        input_names=["q", "k", "v", "mask"], output_names=["y"],
        dynamic_axes={n: {0: "batch", 2 if n != "mask" else 1: "sequence"} for n in ("q", "k", "v", "mask")},
    )  # fmt: skip
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node if n.domain == attention.DOMAIN] == ["Attention"]
    assert attention.lower(model, chunk) == 1
    assert not any(n.domain == attention.DOMAIN for n in model.graph.node)
    assert [n.op_type for n in model.graph.node].count("Loop") == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = direct(q, k, v, mask, 0.3, window, softcap)
    real = mask.astype(bool)[:, None, :, None]  # query rows that are real tokens (pad rows: anything finite)
    for batch in (slice(None), slice(1, 2)):  # the batch, and one item alone at its own (padded) length
        feeds = {"q": q[batch], "k": k[batch], "v": v[batch], "mask": mask[batch]}
        got = session.run(None, feeds)[0]
        assert np.isfinite(got).all()
        assert np.abs(np.where(real[batch], got - want[batch], 0)).max() <= 1e-5
    ours = attention.reference(*args[:3], args[3].bool(), 0.3, window, softcap).numpy()
    assert np.abs(np.where(real, ours - want, 0)).max() <= 1e-5
