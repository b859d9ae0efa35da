"""The Dockerfile, checked without a Docker engine: stages, the torch-free runtime, user, healthcheck, context."""

from __future__ import annotations

import json
import re

from support.dockerfile import ROOT, args, env_of, healthcheck_command, stages, values_of


def test_dockerfile_stages():
    s = stages()
    assert list(s) == [
        "builder",
        "venv",
        "venv-cpu",
        "venv-gpu",
        "cpu",
        "gpu",
    ]  # gpu last: the default target
    assert args()["CUDA_IMAGE"].startswith("nvidia/cuda:") and "cudnn-runtime" in args()["CUDA_IMAGE"]
    assert values_of(s["gpu"], "FROM") == ["${CUDA_IMAGE} AS gpu"]
    assert any("torch==" in v for v in values_of(s["builder"], "RUN"))
    assert any("polyreward export --default" in v for v in values_of(s["builder"], "RUN"))
    for name, runtime in (("cpu", "onnxruntime=="), ("gpu", "onnxruntime-gpu==")):
        venv = " ".join(values_of(s[f"venv-{name}"], "RUN"))
        assert runtime in venv and "torch" not in venv
        final = s[name]
        assert "torch" not in " ".join(i["content"] for i in final)
        user = values_of(final, "USER")[-1]
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"{name}: USER {user!r} must be numeric and not root"
        assert json.loads(values_of(final, "ENTRYPOINT")[-1]) == ["polyreward", "serve"]
        assert healthcheck_command(final)[0] == "python3"
        env = env_of(final)
        assert env["POLYREWARD_ARTIFACTS"] == "/models" and env["POLYREWARD_HOST"] == "0.0.0.0"
        assert f"--from=venv-{name} /opt/polyreward /opt/polyreward" in values_of(final, "COPY")
        assert "--from=builder /artifacts /models" in values_of(final, "COPY")


def test_dockerignore_lets_every_copy_through():
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    sources = [
        src.rstrip("/")
        for stage in stages().values()
        for value in values_of(stage, "COPY")
        if not value.startswith("--from")
        for src in value.split()[:-1]
    ]
    assert sources, "no COPY from the build context"
    missing = [src for src in sources if src not in allowed]
    assert not missing, f".dockerignore leaves out {missing}"
