"""Tracing a PyTorch reward model (or its embedder) into an ONNX file.

The TorchScript exporter at opset 17: encoders with eager attention, the form ONNX Runtime's transformer
optimizer fuses (measured: README, "Measured on this machine"); decoders with polyreward's attention node,
lowered to a loop over query chunks (`polyreward.models.torch.attention`). The dynamo exporter is the tested
fallback (decoders' attention then stays unchunked). A graph over 2 GB keeps its weights in one external file
next to it, page-aligned.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from polyreward.models.runtime.batching import collate
from polyreward.models.runtime.builder import InputBuilder, Kind
from polyreward.models.runtime.items import ChatItem, PromptItem
from polyreward.models.runtime.manifest import InputPolicy

log = logging.getLogger("polyreward.export")

OPSET = 17
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "prompt_input_ids": {0: "prompts", 1: "prompt_sequence"},
    "prompt_attention_mask": {0: "prompts", 1: "prompt_sequence"},
    "prompt_index": {0: "batch"},
    "gating_index": {0: "batch"},
    "rewards": {0: "batch"},
    "gating": {0: "batch"},
    "score": {0: "batch"},
    "uncertainty": {0: "batch"},
    "group_probs": {0: "batch"},
    "group_scores": {0: "batch"},
    "group_gating": {0: "batch"},
    "reward_embedding": {0: "batch"},
    "gating_embedding": {0: "batch"},
}
# Traced example: mixed lengths, a shared prompt and a distinct one, so no shape is specialised.
TRACE_ITEMS = [
    PromptItem(prompt="What is the capital of France?", response="Paris."),
    PromptItem(
        prompt="What is the capital of France?", response="The capital of France is Paris, on the Seine."
    ),
    ChatItem(
        messages=[
            {"role": "user", "content": "Write a haiku about the sea."},
            {
                "role": "assistant",
                "content": "Waves fold into foam / the tide keeps its old promise / salt on every stone",
            },
        ]
    ),
]


def trace_example(tokenizer, kind: Kind, policy: InputPolicy) -> dict[str, np.ndarray]:
    """The traced example's graph inputs. The policy's length limit and error mode are for users' inputs: the
    traced example is never cut."""
    builder = InputBuilder(
        tokenizer, kind, policy.model_copy(update={"truncation": "left", "max_length": 512})
    )
    return collate(
        builder.build(TRACE_ITEMS), kind=kind, pad_id=builder.pad_id, padding_side=policy.padding_side
    )


class _TransposedLinear(torch.nn.Module):
    """A Linear that keeps W^T and computes x @ W^T + b: traced, that is MatMul on the stored tensor itself."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def store_transposed(module: torch.nn.Module) -> None:
    """Swap every Linear for a `_TransposedLinear`, one weight at a time.

    A traced Linear on 3-D input is MatMul(x, Transpose(W)), and the exporter constant-folds that into a
    transposed copy of every weight, which doubles peak memory during export. With W^T stored, the exporter
    writes the parameter as it is. Only decoders: the BERT fusion patterns of encoders stay as they were.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, _TransposedLinear(child))
                child.weight.data = torch.empty(0, dtype=child.weight.dtype)


def release(module: torch.nn.Module) -> None:
    """Free a module's weights even if something still references the module (it is unusable after)."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype)


def export_onnx(
    model: torch.nn.Module,
    example: dict[str, np.ndarray],
    input_names: list[str],
    path: Path,
    exporter,
    attention_chunk: int | None = None,
):
    """Trace `model` into `path`. A graph over 2 GB keeps its weights in ONE external file, `<path>.data`.
    Decoder attention is lowered to loops over `attention_chunk` query tokens (`attention.lower`)."""
    args = tuple(torch.from_numpy(example[n]) for n in input_names)
    outputs = model.output_names()
    axes = {k: v for k, v in DYNAMIC_AXES.items() if k in input_names or k in outputs}
    scratch = path.parent / f".{path.name}.export"  # the exporter may write one file per large tensor
    scratch.mkdir()
    t = time.perf_counter()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model, args, str(scratch / path.name), dynamo=False, opset_version=OPSET,
                input_names=input_names, output_names=outputs, dynamic_axes=axes,
            )  # fmt: skip
        else:
            program = torch.onnx.export(
                model, args, dynamo=True, input_names=input_names, output_names=outputs,
                dynamic_shapes=dynamic_shapes(input_names), optimize=True,
            )  # fmt: skip
            program.save(str(scratch / path.name))
            del program
    gather_external_data(scratch / path.name, path)
    shutil.rmtree(scratch)
    lower_attention(path, attention_chunk)
    log.info("exported %s with the %s exporter in %.1fs", path.name, exporter, time.perf_counter() - t)


def lower_attention(path: Path, chunk: int | None = None) -> None:
    """Replace the decoder attention nodes of graph `path` by their chunked loops (`attention.lower`)."""
    from polyreward.models.torch import attention

    chunk = chunk or attention.CHUNK
    model = onnx.load(str(path), load_external_data=False)
    if count := attention.lower(model, chunk):
        onnx.save(model, str(path))  # the weights stay where they are, in the external file if any
        log.info("lowered %d attention nodes of %s to query chunks of %d", count, path.name, chunk)


def gather_external_data(src: Path, dst: Path, chunk: int = 1 << 24) -> None:
    """Move graph `src` to `dst`, streaming all its external tensors (wherever they lie next to `src`) into
    the single file `<dst>.data`; nothing is loaded into memory whole. A self-contained graph is just moved."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    tensors = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not tensors:
        shutil.move(src, dst)
        return
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            file = src.parent / info.location
            start = info.offset or 0
            length = info.length if info.length is not None else file.stat().st_size - start
            offset += -offset % 4096  # page-aligned, so ONNX Runtime can map the tensors in place
            out.seek(offset)
            with open(file, "rb") as f:
                f.seek(start)
                for pos in range(0, length, chunk):
                    out.write(f.read(min(chunk, length - pos)))
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += length
    onnx.save(model, str(dst))


def dynamic_shapes(input_names: list[str]) -> dict[str, dict[int, object]]:
    """torch.export dims for the dynamo exporter, named like the TorchScript dynamic axes."""
    from torch.export import Dim

    dims = {name: Dim(name) for name in ("batch", "sequence", "prompts", "prompt_sequence")}
    return {name: {axis: dims[label] for axis, label in DYNAMIC_AXES[name].items()} for name in input_names}
