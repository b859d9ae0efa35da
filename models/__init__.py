"""polyreward's models: the torch-free runtime (`polyreward.models.runtime`) that scores artifacts, and the
torch side (`polyreward.models.torch`) that builds them. See docs/architecture.md.

Importing `polyreward.models` never imports torch or onnxruntime; the names below load on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("polyreward")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["ArtifactError", "ChatItem", "Item", "Manifest", "PromptItem", "ScoreResult", "Scorer", "TextItem"]

_LAZY = {
    "Scorer": "scorer",
    "ScoreResult": "scorer",
    "Item": "items",
    "ChatItem": "items",
    "PromptItem": "items",
    "TextItem": "items",
    "Manifest": "manifest",
    "ArtifactError": "artifact",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"polyreward.models.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'polyreward.models' has no attribute {name!r}")
