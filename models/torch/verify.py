"""Checks an export must pass before a graph ships: the ONNX outputs against PyTorch on the traced example."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.manifest import GraphEntry
from polyreward.models.runtime.session import create_session

log = logging.getLogger("polyreward.export")


class ExportError(PolyrewardError):
    """The export cannot go ahead (bad option) or produced a graph that does not match PyTorch."""


@torch.no_grad()
def run_torch(model: torch.nn.Module, example: dict[str, np.ndarray], input_names: list[str]):
    """The PyTorch outputs a graph traced from `model` must reproduce."""
    out = model(*(torch.from_numpy(example[n]) for n in input_names))
    return [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def check_against_torch(
    want: list[np.ndarray], example: dict[str, np.ndarray], path: Path, *, fp16: bool = False
) -> None:
    """Refuse to ship a graph whose outputs differ from PyTorch's (`want`) on the traced example, run exactly as
    written (no ORT optimizations). Tolerance: 1e-3, or 5e-2 for an fp16 graph."""
    import onnxruntime as ort

    # The CPU provider runs fp16 MatMuls in float32 and holds float32 copies of the weights (3x the graph's
    # size in host memory, measured), so an fp16 graph is checked on the GPU when there is one.
    gpu = fp16 and "CUDAExecutionProvider" in ort.get_available_providers()
    session = create_session(path, "cuda" if gpu else "cpu", optimize=False)
    got = session.run(None, {i.name: example[i.name] for i in session.get_inputs()})
    del session
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    if not diff <= (5e-2 if fp16 else 1e-3):
        raise ExportError(
            f"{path.name}: ONNX output differs from PyTorch by {diff:.3g} on the traced example"
        )
    log.info("%s matches PyTorch on the traced example (max abs diff %.2g)", path.name, diff)


def graph_entry(path: Path, fused: bool) -> GraphEntry:
    """The manifest's record of a graph: its file, external data, inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    data = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})
    return GraphEntry(
        file=path.name,
        data_files=data,
        inputs=[i.name for i in graph.input],
        outputs=[o.name for o in graph.output],
        fused=fused,
    )
