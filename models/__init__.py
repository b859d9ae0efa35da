"""polyreward's model contract: objectives, input building, heads, manifest, ONNX export and the ONNX scorer.

Importing `models` never imports torch; the torch modules (`models.heads`, `models.torch_model`,
`models.export`, `models.parity`) are only needed to train and export.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("polyreward")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["ArtifactError", "Item", "Manifest", "ScoreResult", "Scorer", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import models` stays light and does not need onnxruntime.
    if name in ("Scorer", "ScoreResult"):
        from models import scorer

        return getattr(scorer, name)
    if name == "Item":
        from models.inputs import Item

        return Item
    if name == "Manifest":
        from models.manifest import Manifest

        return Manifest
    if name == "ArtifactError":
        from models.artifact import ArtifactError

        return ArtifactError
    raise AttributeError(f"module 'models' has no attribute {name!r}")
