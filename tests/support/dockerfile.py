"""The Dockerfile, parsed (no Docker engine here): stages, global ARGs, ENV, HEALTHCHECK."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]


def stages() -> dict[str, list[dict]]:
    """Instructions per stage, by stage name (comments left out)."""
    out: dict[str, list[dict]] = {}
    current = None
    for ins in DockerfileParser(str(ROOT / "Dockerfile")).structure:
        if ins["instruction"] == "FROM":
            current = ins["value"].split()[-1]
            out[current] = []
        if current and ins["instruction"] != "COMMENT":
            out[current].append(ins)
    return out


def args() -> dict[str, str]:
    """The global ARG defaults (before the first FROM)."""
    found = {}
    for ins in DockerfileParser(str(ROOT / "Dockerfile")).structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, value = ins["value"].split("=", 1)
            found[key] = value
    return found


def values_of(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def env_of(stage: list[dict]) -> dict[str, str]:
    env = {}
    for value in values_of(stage, "ENV"):
        env.update(part.split("=", 1) for part in shlex.split(value))
    return env


def healthcheck_command(stage: list[dict]) -> list[str]:
    (value,) = values_of(stage, "HEALTHCHECK")
    return json.loads(value.split(" CMD ", 1)[1])
