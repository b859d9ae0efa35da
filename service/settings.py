"""Server settings, and the policy that turns them into how batches run on this machine.

Precedence: `polyreward serve` flags, then `POLYREWARD_*` environment variables, then the JSON file named by
POLYREWARD_CONFIG (`polyreward tune` writes one), then the defaults.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, JsonConfigSettingsSource, SettingsConfigDict

from polyreward.models.runtime.batching import DEFAULT_MAX_ITEMS, DEFAULTS_TEXT
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.gating_cache import DEFAULT_ITEMS as DEFAULT_GATING_CACHE
from polyreward.models.runtime.session import AUTO_PRECISION_TEXT
from polyreward.service.tenants import TenantPolicy

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


class Settings(BaseSettings):
    """Settings of `polyreward serve` (see the module docstring for where they come from)."""

    model_config = SettingsConfigDict(env_prefix="POLYREWARD_", extra="ignore")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys (none: no auth)")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    precision: str = Field("auto", description=AUTO_PRECISION_TEXT)
    device: str = "auto"
    token_budget: int | None = Field(None, ge=64, description=f"padded tokens per batch [{DEFAULTS_TEXT}]")
    max_batch_items: int = Field(DEFAULT_MAX_ITEMS, ge=1)
    workers: int | None = Field(None, ge=1, description="batches run side by side [2 on CPU, 1 on GPU]")
    threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads per batch [the CPUs the container may use]"
    )
    spin: bool | None = Field(
        None, description="ONNX Runtime threads spin while idle [off with 2+ CPU workers]"
    )
    busy_threads: int | None = Field(
        None, ge=0, description="ONNX Runtime threads of a batch that starts while another one runs (0: as "
        "many as `threads`) [1 on CPU with 2+ workers]",
    )  # fmt: skip
    batch_nice: int | None = Field(
        None, ge=0, le=19, description="nice value of the threads that run batches (Linux; request handling "
        "and light tenants' batches keep the process's) [19 on CPU, 0 on GPU]",
    )  # fmt: skip
    profiles: Path | None = Field(
        None, description="reward profiles file (YAML): named recipes and the default one (README, profiles)"
    )
    rules: Path | None = Field(
        None, description="rule objectives file (YAML): format, length, JSON, correctness checks and trace "
        "stripping, joined to every model's objectives (README, rule objectives)",
    )  # fmt: skip
    unrecognized_queries: Literal["score", "refuse"] = Field(
        "score", description="/get_reward queries in no known chat format: score the text as it is (counted "
        "in polyreward_unrecognized_queries_total) or refuse them with 422",
    )  # fmt: skip
    gating_cache_items: int = Field(
        DEFAULT_GATING_CACHE, ge=0, description="prompts whose gating weights are kept across requests "
        "(encoder models; 0: off)",
    )  # fmt: skip
    tenants: dict[str, TenantPolicy] = Field(
        default_factory=dict, description="per-tenant weight and max_queue_items, by tenant name (README, "
        "tenants); unnamed tenants get weight 1 and the server's queue cap",
    )  # fmt: skip
    tenant_token_budget: int | None = Field(
        None, ge=16, description="padded tokens per batch while two or more tenants have items waiting "
        "(shorter batches: another tenant's item waits less for the one running) [token_budget]",
    )  # fmt: skip
    max_tenant_labels: int = Field(
        16, ge=0, description="tenants beyond the named ones that get their own metrics label (then 'other')"
    )
    max_wait_ms: float = Field(2.0, ge=0)
    max_queue_items: int = Field(4096, ge=1)
    max_items_per_request: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    request_timeout: float = Field(60.0, gt=0, description="seconds before a request answers 504")
    drain_seconds: float = Field(
        5.0, ge=0, description="after SIGTERM: /ready answers 503 this long while requests are still served"
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_other):
        path = os.environ.get("POLYREWARD_CONFIG")
        if not path:
            return init_settings, env_settings
        if not Path(path).is_file():
            raise PolyrewardError(f"POLYREWARD_CONFIG: {path}: not found")
        return init_settings, env_settings, JsonConfigSettingsSource(settings_cls, json_file=path)

    def api_key_list(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_key_file:
            keys += [k.strip() for k in self.api_key_file.read_text().splitlines() if k.strip()]
        return keys

    def execution(self, device: str) -> Execution:
        """How batches run on `device`: these settings, or the measured defaults (`execution`)."""
        return execution(device, self.workers, self.threads, self.spin, self.batch_nice, self.busy_threads)


@dataclass(frozen=True)
class Execution:
    workers: int  # inference threads, each running one batch at a time on the shared session
    threads: int | None  # ONNX Runtime intra-op threads per batch (None: ORT's default)
    spin: bool | None  # ONNX Runtime threads spin while idle (None: ORT's default)
    nice: int = 0  # nice value of the threads that run batches (their ORT threads included)
    busy_threads: int | None = (
        None  # intra-op threads of a batch that starts beside another (None: `threads`)
    )


def execution(
    device: str,
    workers: int | None = None,
    threads: int | None = None,
    spin: bool | None = None,
    nice: int | None = None,
    busy_threads: int | None = None,
) -> Execution:
    """How batches run on `device`, each value given or its measured default.

    On a CPU: two batches side by side, threads parked rather than spinning, a batch alone free to use every
    core and one that starts beside another with one thread (measured on 2 cores under 64 single-item clients,
    fp32: 0.90-0.99x the offline Scorer's items/s, against 0.80-0.99x with every core's thread for both and 0.74x
    for one batch at a time, while one client alone keeps its latency), at nice 19 so that request handling and
    light tenants' batches go first (docs/performance.md, tenants). On a GPU: one batch at a time.
    """
    cpu = device == "cpu"
    workers = workers or (2 if cpu else 1)
    threads = threads or (available_cpus() if cpu else None)
    spin = spin if spin is not None else (False if cpu and workers > 1 else None)
    nice = nice if nice is not None else (19 if cpu else 0)
    if busy_threads is None:
        busy_threads = 1 if cpu and workers > 1 else 0
    busy = busy_threads if 0 < busy_threads < (threads or 0) else None
    return Execution(workers, threads, spin, nice, busy)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's CPU limit;
    os.cpu_count() reports the whole node, and one ORT thread per node core would thrash a 2-CPU pod)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
