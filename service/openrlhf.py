"""OpenRLHF's Python reward function, backed by a polyreward server: `reward_func(queries, prompts, labels)`.

OpenRLHF 0.11.2 (`openrlhf.cli.train_ppo_ray`) has one flag for a remote reward, `--reward.remote_url` (older
releases called it `--remote_rm_url`, which 0.11.2 refuses). Given URLs (comma-separated), each vLLM engine
actor posts `{"query": [prompt + response], "prompts": [prompt], "labels": [label]}` to one of them, one
rollout per request, with no Authorization header and no way to add one. Given a path ending in `.py`, the
same actor loads the file (`importlib.util.spec_from_file_location`) and calls its `reward_func` in a thread
for each rollout, with lists of one. This module is that function: it posts to the server's `/get_reward`
through `RewardClient` (its retry policy: 429/503 wait for Retry-After, connection failures, 502 and 504 back
off) with the API key, and returns the server's answer as OpenRLHF reads it, so it gives the same training
tensors as the plain URL:

    # polyreward_reward.py: the whole file, on a path every Ray node can read
    from polyreward.service.openrlhf import reward_func  # noqa: F401

    export POLYREWARD_URL=http://rm-host:8000 POLYREWARD_API_KEY=...   # where `ray start` / the driver runs
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url /abs/path/polyreward_reward.py \\
        --data.input_key prompt --data.label_key answer

`POLYREWARD_URL` is the server's base URL (a trailing `/get_reward` is accepted); `POLYREWARD_API_KEY` is
optional. Both are read at each call, in the Ray workers, so they must reach them: set them before
`ray start` (or before the driver starts a local cluster), or pass them in `ray job submit --runtime-env-json
'{"env_vars": {...}}'`. `labels` are the `--data.label_key` values ("" without one), sent as they are.

The return value is `{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}` with one float per
query: plain lists, exactly the JSON that OpenRLHF's own HTTP client hands over (`service/` never imports
torch, tests/test_layering.py). OpenRLHF turns either into tensors (`torch.tensor([value])`). `scores` equals
`rewards` (unbounded), so keep `--algo.dynamic_filtering_enable` off or set `--algo.dynamic_filtering_range`
to match. An error raises `ServiceError` (or the transport error once retries are spent); OpenRLHF logs it and
leaves the rollout without a reward.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from polyreward.service.client import RewardClient

_clients: dict[tuple[str, str | None], RewardClient] = {}
_lock = threading.Lock()


def _client() -> RewardClient:
    """One client per (URL, key) and process, shared by OpenRLHF's threads (httpx's pool is thread-safe)."""
    url = os.environ.get("POLYREWARD_URL", "").strip()
    if not url:
        raise RuntimeError("POLYREWARD_URL is not set: the polyreward server's base URL, e.g. http://rm:8000")
    url = url.rstrip("/").removesuffix("/get_reward")
    key = os.environ.get("POLYREWARD_API_KEY") or None
    with _lock:
        if (url, key) not in _clients:
            _clients[url, key] = RewardClient(url, api_key=key)
        return _clients[url, key]


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence) -> dict:
    """OpenRLHF's reward function: the server's default-profile reward for each templated query."""
    if not queries:
        return {"rewards": [], "scores": [], "extra_logs": {}}
    return _client().get_reward(queries, prompts, labels).model_dump()
