"""Reading and writing artifact directories, with sha256 checks on every file used.

Only JSON, safetensors, ONNX and tokenizer files are ever read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from polyreward.models.runtime.errors import PolyrewardError, describe
from polyreward.models.runtime.files import sha256_file
from polyreward.models.runtime.manifest import SUPPORTED_SCHEMA_VERSIONS, FileEntry, Manifest, Precision

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
HEADS_FILE = "heads.safetensors"


class ArtifactError(PolyrewardError):
    """An artifact is missing, damaged or of an unknown format. The message names the file."""


def load_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """Parse and validate manifest.json; refuse unknown schema versions before anything else."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: not found — is {artifact_dir} a polyreward artifact directory?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from e
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ArtifactError(
            f"{path}: manifest schema_version {version!r} is not supported by this polyreward "
            f"(supported: {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade polyreward or re-export "
            "the artifact"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{path}: invalid manifest: {describe(e)}") from None


def find_artifacts(path: str | os.PathLike) -> list[Path]:
    """The artifact at `path`, or else every artifact directly under it (a mounted model volume), by name."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        raise ArtifactError(f"{root}: not found")
    found = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    if not found:
        raise ArtifactError(f"{root}: no {MANIFEST} in it or in its subdirectories; nothing to serve")
    return found


def verify_files(artifact_dir: str | os.PathLike, manifest: Manifest, names: Iterable[str]) -> None:
    """Check size and sha256 of each named file against the manifest; raise naming the first bad file."""
    root = Path(artifact_dir)
    for name in names:
        entry = manifest.files.get(name)
        path = root / name
        if entry is None:
            raise ArtifactError(f"{path}: not listed in {root / MANIFEST}; the artifact is incomplete")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            raise ArtifactError(
                f"{path}: checksum mismatch — the file was modified or damaged after export; re-export the artifact"
            )


def tokenizer_files(manifest: Manifest) -> list[str]:
    return sorted(n for n in manifest.files if n.startswith(TOKENIZER_DIR + "/"))


def graph_files(manifest: Manifest, precision: Precision) -> list[str]:
    graph = manifest.graphs[precision]
    return [graph.file, *graph.data_files]


def verify_graph(artifact_dir: str | os.PathLike, manifest: Manifest, precision: Precision) -> None:
    """Verify every file a scorer of this precision reads: the tokenizer and the graph (with its data)."""
    if precision not in manifest.graphs:
        raise ArtifactError(
            f"{Path(artifact_dir) / MANIFEST}: no {precision} graph in this artifact "
            f"(has: {', '.join(manifest.graphs)})"
        )
    verify_files(artifact_dir, manifest, [*tokenizer_files(manifest), *graph_files(manifest, precision)])


def _walk(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p


def finalize_manifest(artifact_dir: Path, manifest: Manifest) -> Manifest:
    """Record checksum and size of every file in the directory and write manifest.json."""
    files = {
        p.relative_to(artifact_dir).as_posix(): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in _walk(artifact_dir)
    }
    manifest = Manifest.model_validate({**manifest.model_dump(), "files": files})
    (artifact_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _apply_umask(root: Path) -> None:
    """Give the staged tree the modes a plain mkdir/open would (mkdtemp and some writers use 0700/0600), so a
    server running as another user (a container mounting the artifact) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build into a temporary sibling directory and move it into place only when the block succeeds.

    A crash never leaves a half-written artifact at `out`.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
