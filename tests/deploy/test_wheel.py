"""The built wheel in a fresh venv, as a serving container and a trainer get it: `polyreward[serve]` with the
pinned onnxruntime and no torch. It serves as the image runs it, and it works inside someone else's training
repository, where a `models/` package and a `service.py` of theirs sit next to the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
from support.dockerfile import ROOT, args, env_of, healthcheck_command, stages, values_of
from support.recipes import debiased
from support.servers import wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.integration]
RUN = {"check": True, "capture_output": True, "text": True}
ITEM = {"prompt": "What is 2 + 2?", "response": "4."}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv with the wheel's `serve` extra and the image's pinned onnxruntime."""
    root = tmp_path_factory.mktemp("wheel")
    wheels, venv = root / "wheels", root / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT], **RUN)
    subprocess.run([sys.executable, "-m", "venv", venv], **RUN)
    (wheel,) = wheels.glob("polyreward-*.whl")
    ort = f"onnxruntime=={args()['ORT_VERSION']}"
    subprocess.run([venv / "bin" / "pip", "install", "-q", f"{wheel}[serve]", ort], **RUN)
    return venv


def test_the_wheel_installs_one_namespace_and_no_torch(venv):
    installed = {
        p["name"].lower()
        for p in json.loads(subprocess.run([venv / "bin" / "pip", "list", "--format=json"], **RUN).stdout)
    }
    assert "torch" not in installed and "onnxruntime" in installed and "fastapi" in installed
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = {
        p.name
        for p in site.iterdir()
        if p.name.split(".")[0] in {"polyreward", "models", "service", "training", "rescore"}
    }
    assert {n for n in ours if not n.startswith("polyreward")} == set(), (
        ours
    )  # nothing generic at the top level
    assert (site / "polyreward" / "models" / "default" / "heads.safetensors").is_file()


def test_runtime_stage_serves_without_torch(venv, tmp_path, export_family, free_port):
    """The runtime stage, reproduced without Docker: started by the image's ENTRYPOINT with the image's ENV, a
    directory of artifacts mounted as /models would be, and checked by the image's HEALTHCHECK."""
    s = stages()
    models = export_family("minilm").parent  # a directory holding one artifact, like the /models mount
    env = {k: v.replace("$PATH", os.environ["PATH"]) for k, v in env_of(s["cpu"]).items()}
    port = free_port()
    env |= {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    env |= {"POLYREWARD_ARTIFACTS": str(models), "POLYREWARD_HOST": "127.0.0.1", "POLYREWARD_PORT": str(port)}
    entrypoint = json.loads(values_of(s["cpu"], "ENTRYPOINT")[-1])
    proc = subprocess.Popen(entrypoint, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(healthcheck_command(s["cpu"]), env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, f"server exited: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "HEALTHCHECK never passed in 120 s"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        wait_ready(lambda path: httpx.get(url + path, timeout=2))
        r = httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"][0]["rewards"]) > 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


TRAINER = """
import json, sys
from polyreward.service.client import RewardClient, as_trl_reward_funcs

url = sys.argv[1]
with RewardClient(url) as rm:
    objectives = rm.models()[0]["objectives"]
(score,) = as_trl_reward_funcs(url)
per_objective = as_trl_reward_funcs(url, objectives=objectives[:2])
prompts, completions = ["What is 2 + 2?", "Name a prime."], ["4.", "Seven."]
print(json.dumps({
    "score": score(prompts=prompts, completions=completions),
    "objectives": [f(prompts=prompts, completions=completions) for f in per_objective],
    "names": [f.__name__ for f in per_objective],
}))
"""


def test_a_trainers_own_models_and_service_do_not_shadow_polyreward(venv, tmp_path, export_family, serve):
    """From a directory holding its own `models/__init__.py` and `service.py` (both first on sys.path), the
    installed client builds TRL reward functions and scores against a server started in that directory too."""
    from polyreward.models.runtime.scorer import Scorer

    trainer = tmp_path / "trainer"
    (trainer / "models").mkdir(parents=True)
    (trainer / "models" / "__init__.py").write_text(
        'raise ImportError("the trainer\'s own models package")\n'
    )
    (trainer / "service.py").write_text('raise ImportError("the trainer\'s own service module")\n')
    (trainer / "train.py").write_text(textwrap.dedent(TRAINER))
    python, artifact = venv / "bin" / "python", export_family("minilm")
    # `-m` in the trainer's directory: it comes first on the server's sys.path as well.
    with serve(artifact, command=(python, "-m", "polyreward.models.cli", "serve"), cwd=trainer) as (url, _):
        done = subprocess.run([python, "train.py", url], cwd=trainer, timeout=120, **RUN)
    got = json.loads(done.stdout)
    offline = Scorer(artifact, precision="fp32", device="cpu")
    want = offline.score(
        [{"prompt": "What is 2 + 2?", "response": "4."}, {"prompt": "Name a prime.", "response": "Seven."}]
    )
    assert np.allclose(got["score"], [w.score for w in want], atol=1e-4)
    assert np.allclose(got["objectives"], debiased(offline.manifest, want)[:, :2].T, atol=1e-4)
    assert got["names"] == [f"polyreward_{n}" for n in offline.objectives[:2]]
    shadowed = subprocess.run([python, "-c", "import models"], cwd=trainer, capture_output=True, text=True)
    assert "the trainer's own models package" in shadowed.stderr  # theirs, as it should be
