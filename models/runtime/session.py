"""ONNX Runtime set-up in one place: the device, the graph precision an artifact is run in, and the session.

Every ORT session polyreward opens (the scorer, featurization's embedder, the exporter's checks) comes from
`create_session`, so providers, threads, spinning and the loud CPU-fallback warning are the same everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import Literal

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.manifest import PRECISIONS, Precision

log = logging.getLogger("polyreward.session")

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEVICES = ("auto", *PROVIDERS)
# What "auto" means, for help texts and docs: int8 is never picked by itself (it ranks like fp32, Spearman 0.998
# on the default model, but its values differ from fp32's by up to about 0.4).
AUTO_PRECISION_TEXT = "auto: fp16 on a GPU when the artifact has it, else fp32; int8 only when asked for"


def resolve_device(device: str) -> str:
    """ "auto" → "cuda" when onnxruntime-gpu sees a GPU, else "cpu"; anything else is checked and kept."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise PolyrewardError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    if device != "auto":
        return device
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def resolve_precision(precision: str, graphs: Iterable[str], device: str) -> Precision:
    """The graph to run. "auto": fp16 on a GPU device when the artifact has it (or has no fp32), else fp32."""
    if precision not in ("auto", *PRECISIONS):
        raise PolyrewardError(f"precision: {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    graphs = set(graphs)
    return "fp16" if "fp16" in graphs and (device != "cpu" or "fp32" not in graphs) else "fp32"


def create_session(
    graph: str | os.PathLike,
    device: str = "cpu",
    *,
    threads: int | None = None,
    spin: bool | None = None,
    optimize: bool = True,
    nice: int = 0,
):
    """An `onnxruntime.InferenceSession` on `device`'s providers (those this onnxruntime build has).

    threads / spin: intra-op threads (default: one per core) and whether they spin while waiting for work
    (default: ORT's, on). optimize=False runs the graph exactly as written (export checks). nice: the nice
    value of the intra-op threads the session starts (`lower_priority`; 0: the process's own). A provider that
    was asked for but is not the one the session really runs on is logged loudly: scoring works, but slowly.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    available = ort.get_available_providers()
    requested = PROVIDERS[device]
    before = _threads()
    session = ort.InferenceSession(str(graph), options, providers=[p for p in requested if p in available])
    if nice:  # ORT starts its intra-op pool with the session: the threads that appeared meanwhile
        for tid in _threads() - before:
            lower_priority(nice, tid)
    if falls_back(session, device):
        log.warning(
            "!!! %s was requested but the session runs on %s (available here: %s). Scoring works but is "
            "slow; install onnxruntime-gpu with a matching CUDA/cuDNN to use the GPU. !!!",
            requested[0], session.get_providers()[0], ", ".join(available),
        )  # fmt: skip
    return session


def falls_back(session, device: str) -> bool:
    """True when the session does not run on the first provider `device` asks for."""
    return session.get_providers()[0] != PROVIDERS[device][0]


def lower_priority(nice: int, tid: int | None = None) -> None:
    """Raise thread `tid`'s nice value (default: the calling thread's) to `nice`, never lowering it.

    On Linux a thread has a nice value of its own, so a server runs its batches at a low priority while its
    event loop, tokenizers and express lane keep the process's: under a flood a light request's work is not
    shared out evenly with the flood's (`polyreward.service.batcher`). Raising it needs no privilege; elsewhere
    this does nothing.
    """
    if not nice or not sys.platform.startswith("linux"):
        return
    tid = tid or threading.get_native_id()
    with contextlib.suppress(OSError):  # the thread has ended meanwhile
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


def _threads() -> set[int]:
    """The native ids of this process's threads (Linux; elsewhere none)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()
