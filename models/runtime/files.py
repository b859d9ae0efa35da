"""File primitives every writer shares: chunked sha256, writes that land whole or not at all, and YAML
settings files read into a pydantic model."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from polyreward.models.runtime.errors import PolyrewardError, describe

M = TypeVar("M", bound=BaseModel)
CHUNK = 1 << 22


def update_sha256(digest, path: Path, chunk: int = CHUNK) -> int:
    """Feed a file into `digest` in chunks (never whole in memory); returns the bytes read."""
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    update_sha256(digest, path)
    return digest.hexdigest()


def sha256_tree(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a file, or of every file of a directory in name order, names included."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for f in files:
        if path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode())
        size += update_sha256(digest, f)
    return digest.hexdigest(), size


def atomic_write(path: Path, data: str | Iterable[str], *, fsync: bool = False) -> None:
    """Write text to `path` through a temporary sibling renamed into place: a crash leaves the old file or the
    new one, never half of either. `fsync` flushes it to disk first (for files a resumed run trusts)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines([data] if isinstance(data, str) else data)
    atomic_replace(tmp, path, fsync=fsync)


def atomic_replace(tmp: Path, path: Path, *, fsync: bool = False) -> None:
    """Move a finished temporary file into place, optionally flushed to disk first."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_yaml_file(path: Path, model: type[M], what: str, error: type[Exception] = PolyrewardError) -> M:
    """A YAML (or JSON) file validated as `model`; any problem is one `error` naming `what`, the file and the
    field: `rules: rules.yaml: rules.f.format.pattern: ...`."""
    import yaml
    from pydantic import ValidationError

    try:
        return model.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as e:
        raise error(f"{what}: {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{what}: {path}: not YAML: {e}") from None
    except ValidationError as e:
        raise error(f"{what}: {path}: {describe(e)}") from None
