"""Export a backbone plus reward heads into an artifact: ONE ONNX graph per precision.

Each graph runs backbone → pooling → regression → gating → transform and outputs `rewards [N,K]`,
`gating [N,K]` and `score [N]`. Measured facts this follows (DESIGN.md section 5): the TorchScript exporter at
opset 17 with eager attention is the form ONNX Runtime's BERT optimizer fuses; int8 is dynamic per-channel
quantization (per-tensor loses too much rank correlation); fp16 is for the CUDA execution provider.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from models import __version__
from models.artifact import HEADS_FILE, TOKENIZER_DIR, finalize_manifest, sha256_file, staged_directory
from models.errors import PolyrewardError
from models.heads import load_heads, save_heads
from models.inputs import InputBuilder, Item, Kind, collate
from models.manifest import (
    PRECISIONS,
    BackboneInfo,
    CalibrationStat,
    GraphEntry,
    HeadInfo,
    InputPolicy,
    Manifest,
    Precision,
)
from models.torch_model import (
    Embedder,
    RewardModel,
    build_embedder,
    build_reward_model,
    detect_kind,
    load_backbone,
)

log = logging.getLogger("polyreward.export")

OPSET = 17
GRAPH_FILES: dict[Precision, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}
# Heads are tiny and sensitive; they stay in float32 in the int8 and fp16 graphs.
HEAD_NODE_PREFIX = "/heads/"
_DYNAMIC_AXES = {
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
    "reward_embedding": {0: "batch"},
    "gating_embedding": {0: "batch"},
}
# Traced example: mixed lengths, a shared prompt and a distinct one, so no shape is specialised.
_TRACE_ITEMS = [
    Item(prompt="What is the capital of France?", response="Paris."),
    Item(prompt="What is the capital of France?", response="The capital of France is Paris, on the Seine."),
    Item(
        messages=[
            {"role": "user", "content": "Write a haiku about the sea."},
            {
                "role": "assistant",
                "content": "Waves fold into foam / the tide keeps its old promise / salt on every stone",
            },
        ]
    ),
]


class ExportError(PolyrewardError):
    """The export cannot go ahead (bad option) or produced a graph that does not match PyTorch."""


def input_policy(
    config,
    tokenizer,
    kind: Kind,
    *,
    max_length: int | None = None,
    truncation: Literal["left", "error"] = "left",
    padding_side: Literal["left", "right"] | None = None,
) -> InputPolicy:
    """The input policy for a backbone: one place, so featurization and export always agree.

    Defaults: the model's own length limit (capped at 512 for encoders, 4096 for decoders); right padding for
    encoders, left for decoders.
    """
    if max_length is None:
        limits = [
            getattr(config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        ]
        usable = [int(v) for v in limits if isinstance(v, int) and 8 <= v < 1_000_000]
        max_length = min([*usable, 512 if kind == "encoder" else 4096])
    return InputPolicy(
        template=InputBuilder.template_for(tokenizer),
        max_length=max_length,
        truncation=truncation,
        padding_side=padding_side or ("left" if kind == "decoder" else "right"),
    )


def export_artifact(
    backbone_dir: str | os.PathLike,
    heads_file: str | os.PathLike,
    out: str | os.PathLike,
    precisions: Sequence[Precision] = ("fp32", "int8"),
    *,
    name: str | None = None,
    kind: Kind | None = None,
    max_length: int | None = None,
    padding_side: Literal["left", "right"] | None = None,
    truncation: Literal["left", "error"] = "left",
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
    fuse: bool = True,
    overwrite: bool = False,
    version: str | None = None,
    calibration: dict[str, CalibrationStat] | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
) -> Manifest:
    """Build an artifact directory at `out` (written atomically) from a backbone directory and a heads file.

    version, calibration, metrics and provenance (merged into the exporter's own) go into the manifest as given.
    """
    from transformers import AutoConfig

    kind = kind or detect_kind(AutoConfig.from_pretrained(backbone_dir))
    wanted = graphs_to_build(precisions, kind)
    t0 = time.perf_counter()
    # A decoder wanted in fp16 only is loaded and traced in fp16: no fp32 copy of a large model ever exists.
    config, backbone, tokenizer = load_backbone(backbone_dir, dtype=load_dtype(wanted))
    model = build_reward_model(backbone, load_heads(heads_file), kind)
    del backbone  # write_artifact releases the weights once traced; no other reference may keep them
    if kind == "encoder" and padding_side == "left":
        raise ExportError(
            "--padding-side left: encoders must be right-padded (absolute positions, and ORT's fused Attention "
            "reads the mask as per-row lengths)"
        )
    policy = input_policy(
        config, tokenizer, kind, max_length=max_length, truncation=truncation, padding_side=padding_side
    )
    log.info(
        "loaded %s backbone %s (%s) in %.1fs", kind, backbone_dir, config.model_type, time.perf_counter() - t0
    )
    return write_artifact(
        model, config, tokenizer, policy, out, wanted,
        name=name or Path(out).name, backbone_id=str(Path(backbone_dir).resolve()), exporter=exporter,
        fuse=fuse, overwrite=overwrite, version=version, calibration=calibration, metrics=metrics,
        provenance={**(provenance or {}), "heads_sha256": sha256_file(Path(heads_file))},
    )  # fmt: skip


def graphs_to_build(precisions: Sequence[str], kind: Kind) -> list[Precision]:
    """The graphs an export writes, in build order. fp32 is always built (int8, and fp16 for encoders, derive
    from it) except for a decoder wanted in fp16 only, which is traced in fp16 directly."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"--precision: unknown {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    if kind == "decoder" and set(precisions) == {"fp16"}:
        return ["fp16"]
    return [p for p in PRECISIONS if p in {"fp32", *precisions}]


def load_dtype(wanted: Sequence[Precision]) -> torch.dtype:
    """The dtype to load a backbone in for these graphs: fp16 when fp16 is all that is built."""
    return torch.float16 if list(wanted) == ["fp16"] else torch.float32


def write_artifact(
    model: RewardModel,
    config,
    tokenizer,
    policy: InputPolicy,
    out: str | os.PathLike,
    wanted: Sequence[Precision],
    *,
    name: str,
    backbone_id: str,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
    fuse: bool = True,
    overwrite: bool = False,
    version: str | None = None,
    calibration: dict[str, CalibrationStat] | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
) -> Manifest:
    """Write an artifact for a PyTorch reward model (from `graphs_to_build`'s list). Consumes `model`: its
    backbone weights are released after the last trace, so a large model is not held twice in memory.

    fp32 is traced from the model; decoders' fp16 is traced from the same model cast to half precision (heads
    stay float32), which needs no fp32 graph and works for models of any size; encoders' fp16 is converted
    from the fused fp32 graph. int8 is quantized from fp32.
    """
    t0 = time.perf_counter()
    kind = model.kind
    example = _trace_example(tokenizer, kind, policy)
    input_names = model.input_names()
    traced = [p for p in wanted if p == "fp32" or (p == "fp16" and kind == "decoder")]
    if kind == "decoder":
        _store_transposed(model.backbone)
    with staged_directory(Path(out), overwrite) as tmp:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        save_heads(model.heads, tmp / HEADS_FILE)
        fused_ops: dict[str, int] = {}
        for i, precision in enumerate(traced):
            path = tmp / GRAPH_FILES[precision]
            model.backbone.to(torch.float16 if precision == "fp16" else torch.float32)
            want = _run_torch(model, example, input_names)
            _export_onnx(model, example, input_names, path, exporter)
            if i == len(traced) - 1:
                _release(model.backbone)
            if fuse and kind == "encoder":
                fused_ops = _fuse(path, config)
            _check_against_torch(want, example, path, tolerance=5e-2 if precision == "fp16" else 1e-3)
        for precision in wanted:
            if precision == "int8":
                _quantize_int8(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["int8"])
            elif precision == "fp16" and kind == "encoder":
                _convert_fp16(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["fp16"])
        graphs = {p: _graph_entry(tmp / GRAPH_FILES[p], fused=bool(fused_ops)) for p in wanted}
        heads_cfg = model.heads.cfg
        manifest = Manifest(
            name=name,
            backbone=BackboneInfo(
                id=backbone_id,
                kind=kind,
                model_type=config.model_type,
                hidden_size=config.hidden_size,
                pooling="mean" if kind == "encoder" else "last",
            ),
            objectives=heads_cfg.objectives,
            head=HeadInfo(
                kind=heads_cfg.kind,
                gating_temperature=heads_cfg.gating.temperature if heads_cfg.gating else None,
                gating_hidden_dim=heads_cfg.gating.hidden_dim if heads_cfg.gating else None,
                gating_n_hidden=heads_cfg.gating.n_hidden if heads_cfg.gating else None,
            ),
            input=policy,
            graphs=graphs,
            calibration=calibration,
            metrics=metrics or {},
            provenance={**(provenance or {}), **_provenance(exporter, fused_ops)},
            **({"version": version} if version else {}),
        )
        manifest = finalize_manifest(tmp, manifest)
    log.info("wrote %s (%s) in %.1fs", out, ", ".join(wanted), time.perf_counter() - t0)
    return manifest


class _TransposedLinear(torch.nn.Module):
    """A Linear that keeps W^T and computes x @ W^T + b: traced, that is MatMul on the stored tensor itself."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight_t = torch.nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _store_transposed(module: torch.nn.Module) -> None:
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


def _release(module: torch.nn.Module) -> None:
    """Free a module's weights even if something still references the module (it is unusable after)."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype)


def _trace_example(tokenizer, kind: Kind, policy: InputPolicy) -> dict[str, np.ndarray]:
    # The policy's length limit and error mode are for users' inputs: the traced example is never cut.
    builder = InputBuilder(
        tokenizer, kind, policy.model_copy(update={"truncation": "left", "max_length": 512})
    )
    return collate(
        builder.encode(_TRACE_ITEMS), kind=kind, pad_id=builder.pad_id, padding_side=policy.padding_side
    )


def export_embedder(
    backbone_dir: str | os.PathLike, path: str | os.PathLike, *, max_length: int | None = None
) -> InputPolicy:
    """Export the backbone and pooling alone (no heads) as one fp32 graph, for featurization.

    Encoders: (input_ids, attention_mask) -> reward_embedding [N, D] (a prompt is just another sequence);
    decoders: (input_ids, attention_mask, gating_index) -> reward_embedding, gating_embedding. The graph is
    fused like an artifact's, so embeddings match what artifacts compute. Returns the input policy used.
    """
    config, backbone, tokenizer = load_backbone(backbone_dir)
    kind = detect_kind(config)
    embedder = build_embedder(backbone, kind)
    policy = input_policy(config, tokenizer, kind, max_length=max_length)
    example = _trace_example(tokenizer, kind, policy)
    path = Path(path)
    if kind == "decoder":
        _store_transposed(embedder.model.backbone)
    want = _run_torch(embedder, example, embedder.input_names())
    _export_onnx(embedder, example, embedder.input_names(), path, "torchscript")
    if kind == "encoder":
        _fuse(path, config)
    _check_against_torch(want, example, path)
    return policy


def _export_onnx(
    model: RewardModel | Embedder,
    example: dict[str, np.ndarray],
    input_names: list[str],
    path: Path,
    exporter,
):
    """Trace `model` into `path`. A graph over 2 GB keeps its weights in ONE external file, `<path>.data`."""
    args = tuple(torch.from_numpy(example[n]) for n in input_names)
    outputs = model.output_names()
    axes = {k: v for k, v in _DYNAMIC_AXES.items() if k in input_names or k in outputs}
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
                dynamic_shapes=_dynamic_shapes(input_names), optimize=True,
            )  # fmt: skip
            program.save(str(scratch / path.name))
            del program
    _gather_external_data(scratch / path.name, path)
    shutil.rmtree(scratch)
    log.info("exported %s with the %s exporter in %.1fs", path.name, exporter, time.perf_counter() - t)


def _gather_external_data(src: Path, dst: Path, chunk: int = 1 << 24) -> None:
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


def _dynamic_shapes(input_names: list[str]) -> dict[str, dict[int, object]]:
    """torch.export dims for the dynamo exporter, named like the TorchScript dynamic axes."""
    from torch.export import Dim

    dims = {name: Dim(name) for name in ("batch", "sequence", "prompts", "prompt_sequence")}
    return {name: {axis: dims[label] for axis, label in _DYNAMIC_AXES[name].items()} for name in input_names}


def _fuse(path: Path, config) -> dict[str, int]:
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


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    names = [n.name for n in model.graph.node if n.name.startswith(HEAD_NODE_PREFIX)]
    # The quantizer rewrites Gemm into `<name>_MatMul` + Add before it reads the exclusion list.
    return names + [f"{n}_MatMul" for n in names]


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t = time.perf_counter()
    root = logging.getLogger()  # the quantizer logs advice meant for its own examples on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(onnx.load(str(src), load_external_data=False)),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=src.with_name(src.name + ".data").exists(),
        )  # fmt: skip
    finally:
        root.setLevel(level)
    log.info("int8 per-channel dynamic quantization in %.1fs", time.perf_counter() - t)


def _convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    # Symbolic shape inference types every intermediate tensor, so Casts land around the fp32 head nodes
    # (without it the converter leaves an fp16 input on the fp32 regression Gemm and the graph will not load).
    model.convert_float_to_float16(
        keep_io_types=True, use_symbolic_shape_infer=True, node_block_list=_head_nodes(model.model)
    )
    model.save_model_to_file(str(dst))
    log.info("fp16 graph written (inputs and outputs stay int64 / float32, heads float32)")


@torch.no_grad()
def _run_torch(model: RewardModel | Embedder, example: dict[str, np.ndarray], input_names: list[str]):
    out = model(*(torch.from_numpy(example[n]) for n in input_names))
    return [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _check_against_torch(
    want: list[np.ndarray], example: dict[str, np.ndarray], path: Path, tolerance: float = 1e-3
) -> None:
    """Refuse to ship a graph whose outputs differ from PyTorch's (`want`) on the traced example."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The CPU provider runs fp16 MatMuls in float32 and holds float32 copies of the weights (3x the graph's
    # size in host memory, measured), so an fp16 graph is checked on the GPU when there is one.
    gpu = path.name == GRAPH_FILES["fp16"] and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    got = session.run(None, {i.name: example[i.name] for i in session.get_inputs()})
    del session
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    if not diff <= tolerance:
        raise ExportError(
            f"{path.name}: ONNX output differs from PyTorch by {diff:.3g} on the traced example"
        )
    log.info("%s matches PyTorch on the traced example (max abs diff %.2g)", path.name, diff)


def _graph_entry(path: Path, fused: bool) -> GraphEntry:
    graph = onnx.load(str(path), load_external_data=False).graph
    data = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})
    return GraphEntry(
        file=path.name,
        data_files=data,
        inputs=[i.name for i in graph.input],
        outputs=[o.name for o in graph.output],
        fused=fused,
    )


def _provenance(exporter: str, fused_ops: dict[str, int]) -> dict:
    import onnxruntime
    import transformers

    return {
        "polyreward": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "exporter": exporter,
        "opset": OPSET,
        "fused_ops": fused_ops,
    }
