"""Fair shares between the training jobs that share a server (README, "Tenants and fair shares").

Every request carries a tenant: the name of its API key (`name:secret` entries in the key list), an anonymous
`key-<sha256 prefix>` for a bare key, or, with keys off, the `X-Polyreward-Tenant` header ("default" without
one). `FairQueue` holds each tenant's waiting items and hands them out in start-time fair queueing order over
tokens (Goyal et al. 1996): an item of t tokens from a tenant of weight w gets

    start = max(V, finish of that tenant's previous item),   finish = start + t / w

where V, the virtual time, is the smallest start tag among the items of the batch taken last (a
length-sorted batch also takes items from far back in the order); batches are formed around the waiting item
with the smallest finish tag. A tenant that floods the server therefore runs ahead only in virtual
time: another tenant's first item is tagged near V and joins the very next batch, and two tenants that both
keep the queue full get tokens in proportion to their weights. A tenant over its queue quota gets 429 with
Retry-After; the others are still admitted. While tenants compete (`FairQueue.competing`), the batcher also
runs the light tenants' items at once on its express thread (`polyreward.service.batcher`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TENANT = "default"
TENANT_HEADER = "x-polyreward-tenant"
OTHER = "other"  # the metrics label of tenants beyond `max_labels`
COMPETING_SECONDS = 2.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_TEXT = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, le=1000, description="share of the tokens when tenants compete")
    max_queue_items: int | None = Field(
        None, ge=1, description="items this tenant may have waiting; more answer 429 (None: the server's cap)"
    )


class Waiting(Protocol):
    """What the queue needs of an item: its cost in tokens and whether its request is gone."""

    @property
    def tokens(self) -> int: ...

    def gone(self) -> bool: ...


@dataclass
class _Tenant:
    weight: float
    finish: float = 0.0
    items: deque = field(default_factory=deque)  # (finish tag, start tag, seq, item), tags increasing


class FairQueue:
    """Per-tenant queues merged by finish tag. Not thread-safe: the batcher holds its lock around every call."""

    def __init__(self, policies: dict[str, TenantPolicy] | None = None):
        self.policies = policies or {}
        self._tenants: dict[str, _Tenant] = {}
        self._virtual = 0.0
        self._seq = itertools.count()
        self._size = 0
        self._recent: dict[str, float] = {}  # tenant → when it last sent items (the last few seconds only)

    def __len__(self) -> int:
        return self._size

    def competing(self) -> bool:
        """Whether two or more tenants have items waiting or sent some in the last `COMPETING_SECONDS` (one
        that sends a request at a time has nothing waiting between its requests, yet competes)."""
        now = time.monotonic()
        for name in [n for n, at in self._recent.items() if now - at > COMPETING_SECONDS]:
            del self._recent[name]
        return len(self._recent.keys() | {n for n, t in self._tenants.items() if t.items}) > 1

    def depth(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return len(t.items) if t else 0

    def quota(self, tenant: str) -> int | None:
        policy = self.policies.get(tenant)
        return policy.max_queue_items if policy else None

    def push(self, tenant: str, items: Iterable[Waiting]) -> None:
        self._recent[tenant] = time.monotonic()
        t = self._tenants.get(tenant)
        if t is None:
            policy = self.policies.get(tenant)
            t = self._tenants[tenant] = _Tenant(policy.weight if policy else 1.0)
        for item in items:
            start = max(self._virtual, t.finish)
            t.finish = start + max(item.tokens, 1) / t.weight
            t.items.append((t.finish, start, next(self._seq), item))
            self._size += 1

    def window(self, n: int, light: int | None = None) -> list:
        """The first `n` waiting items in fair order (smallest finish tag first), of the tenants with at most
        `light` items waiting if given; their items whose request is gone leave the queue on the way (the
        express thread's light window then scans a few items, not a flood's thousands)."""
        tenants = [t for t in self._tenants.values() if light is None or len(t.items) <= light]
        self._drop_gone(tenants)
        heads = (((f, seq, item) for f, _, seq, item in t.items) for t in tenants)
        return [item for _, _, item in itertools.islice(heapq.merge(*heads), n)]

    def take(self, items: Iterable[Waiting], scanned: int) -> None:
        """Remove the items a batch took from the window of `scanned` items just returned (each tenant's
        part of it is the head of its queue), and advance the virtual time to their smallest start tag: a
        length-sorted batch may also take items from the back of the window, whose tags run far ahead."""
        taken = {id(i) for i in items}
        starts = []
        for t in self._tenants.values():
            head = [t.items.popleft() for _ in range(min(scanned, len(t.items)))]
            kept = [e for e in head if id(e[3]) not in taken]
            starts += [e[1] for e in head if id(e[3]) in taken]
            self._size -= len(head) - len(kept)
            t.items.extendleft(reversed(kept))
        self._virtual = max(self._virtual, min(starts, default=self._virtual))
        self._forget_idle()

    def _drop_gone(self, tenants: list[_Tenant]) -> None:
        for t in tenants:
            if any(entry[3].gone() for entry in t.items):
                kept = deque(e for e in t.items if not e[3].gone())
                self._size -= len(t.items) - len(kept)
                t.items = kept
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Tenants with nothing waiting and nothing ahead of V carry no state, nor does anyone once the
        queue is empty (an idle period owes no tenant anything): the state stays bounded by what waits."""
        if not self._size:
            self._tenants.clear()
            return
        for name in [n for n, t in self._tenants.items() if not t.items and t.finish <= self._virtual]:
            del self._tenants[name]


def tenant_for_key(entry: str) -> tuple[str, str]:
    """(tenant, secret) of one API-key entry: `name:secret` names the tenant; any other entry is a bare secret
    whose tenant is anonymous, `key-` and the first 8 hex digits of its sha256."""
    name, sep, secret = entry.partition(":")
    if sep and secret and NAME.fullmatch(name):
        return name, secret
    return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry


def tenant_from_header(value: str | None) -> str:
    """The tenant a request names in `X-Polyreward-Tenant` when API keys are off ("default" without one)."""
    if value is None:
        return DEFAULT_TENANT
    if not NAME.fullmatch(value):
        raise ValueError(f"header {TENANT_HEADER}: {value[:80]!r} is not a tenant name ({NAME_TEXT})")
    return value


class Labels:
    """Tenant names for metrics: the configured ones and the first `max_labels` others seen, then `other`
    (a client can send any header, and every label value is a new time series)."""

    def __init__(self, known: Iterable[str], max_labels: int = 16):
        self._known = set(known)
        self._seen: set[str] = set()
        self.max_labels = max_labels

    def __call__(self, tenant: str) -> str:
        if tenant in self._known or tenant in self._seen:
            return tenant
        if len(self._seen) < self.max_labels:
            self._seen.add(tenant)
            return tenant
        return OTHER
