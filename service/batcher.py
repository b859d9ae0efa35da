"""Dynamic batching across requests: the core of the service (docs/architecture.md, flow 1).

Rollout workers send many concurrent single-item requests. Each model gets one `Batcher`: requests tokenize
off the event loop, their items join one queue, and threads turn the queue into batches through the scorer's
phases (`tokenize`, `policy`, `collate`, `forward`, `results`) and nothing else of it:

* the *prepare* thread, as soon as the device has taken the previous batch, takes a length-sorted window of
  the first waiting items in fair order (`polyreward.service.tenants.FairQueue`: tenants share the tokens by
  weight; one tenant alone is served oldest first), picks the batch (under the padded-token budget and the
  item cap) that holds the first of them, and collates it, while
* the *infer* thread runs the previous batch through ONNX Runtime and resolves its futures.

So the next batch is ready the moment the device is free. When the device is busy, the prepare thread waits up
to `max_wait` for more items, which costs nothing then and makes batches fuller. Items whose request has gone
(deadline passed, client disconnected) are cancelled futures and are dropped when the next batch is formed.
An inference error fails only the requests in that batch. Backends never see asyncio; handlers never see batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from polyreward.models.runtime.builder import Encoded
from polyreward.models.runtime.items import Item
from polyreward.models.runtime.manifest import Truncation
from polyreward.models.runtime.scorer import Scorer, ScoreResult
from polyreward.models.runtime.session import lower_priority
from polyreward.service.tenants import COMPETING_SECONDS, DEFAULT_TENANT, FairQueue, TenantPolicy

log = logging.getLogger("polyreward.batcher")


class QueueFull(Exception):
    """The queue cap (or the tenant's quota) would be exceeded; the client should retry after `retry_after`."""

    def __init__(self, retry_after: float, what: str = "the scoring queue is full"):
        super().__init__(f"{what}; retry after {retry_after:.1f}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    items: int
    padded_tokens: int
    real_tokens: int
    queue_seconds: float  # mean time its items waited before the batch started
    infer_seconds: float
    gating_cached: int = 0  # items whose gating weights came from the gating cache
    gating_computed: int = 0  # items whose prompt went through the gating pass (and into the cache)


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    infer_seconds: float


@dataclass(eq=False)
class _Pending:
    encoded: Encoded
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return self.encoded.tokens

    def gone(self) -> bool:
        return self.future.done()


class Batcher:
    """One model's queue, prepare thread and inference threads. `start()` before use, `stop()` drains it.

    `workers` inference threads run batches side by side (ONNX Runtime allows concurrent runs); on a CPU,
    while one batch waits on a core the server's other threads took, the other keeps the cores busy (measured
    in docs/performance.md). A batch that starts alone runs on the scorer's session with every thread; with
    `busy_threads`, one that starts beside another runs on a session with that many.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_queue_items: int = 4096,
        max_wait: float = 0.002,
        window_items: int | None = None,
        tokenizer_threads: int = 1,
        workers: int = 1,
        tenants: dict[str, TenantPolicy] | None = None,
        contended_token_budget: int | None = None,
        express: bool = True,
        nice: int = 0,
        busy_threads: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self.scorer = scorer
        self.max_queue_items = max_queue_items
        self.max_wait = max_wait
        self.window_items = window_items or 4 * scorer.policy.max_items
        self.on_batch = on_batch
        self._pending = FairQueue(tenants)
        # While two or more tenants compete, batches stay under this budget: a batch cannot be interrupted,
        # so its length is what another tenant's item may have to wait for (None: the policy's budget).
        self.contended_token_budget = contended_token_budget
        self._cond = threading.Condition()
        self.workers = workers
        self._prepared: queue.Queue = queue.Queue(maxsize=workers)
        # At most one batch prepared ahead per worker: the next one is picked only once a worker has taken the
        # last one, so it is formed from everything that arrived meanwhile (fuller, better-sorted batches).
        self._slot = threading.Semaphore(workers)
        self._express_running = False  # a light tenant's batch is running (`_express_loop`)
        # With `nice`, batches run at a lower priority than request handling, and the express lane on a session
        # of its own at the process's priority: a light tenant's batch then gets the cores it needs at once
        # instead of sharing them evenly with the flood's batches already running.
        self.nice = nice
        self._express_session = scorer.second_session() if express and nice else None
        # A batch that starts while another runs takes `busy_threads` (a session of its own): two batches with
        # every core's thread each would fight over the cores, while a batch alone still gets them all.
        self._busy_session = (
            scorer.second_session(busy_threads, nice) if busy_threads and workers > 1 else None
        )
        self._running = 0  # batches in inference; the device is busy when every worker runs one
        self._running_lock = threading.Lock()
        self._stopping = False
        self._tokenize = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="prepare", daemon=True),
            *([threading.Thread(target=self._express_loop, name="express", daemon=True)] if express else []),
            *(
                threading.Thread(target=self._infer_loop, name=f"infer-{i}", daemon=True)
                for i in range(workers)
            ),
        ]
        self._seconds_per_item = 0.01  # running estimate, for Retry-After

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued item, then end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._tokenize.shutdown(wait=False)

    async def _tokenized(self, items: Sequence[Item], truncation: Truncation | None) -> list[Encoded]:
        """Tokenize off the event loop (raises `InputRejected` for items the model refuses)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize, self.scorer.tokenize, list(items), truncation)

    def tenant_depth(self, tenant: str) -> int:
        return self._pending.depth(tenant)

    async def score(
        self,
        items: Sequence[Item],
        *,
        timeout: float | None = None,
        truncation: Truncation | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> list[ScoreResult]:
        """Score one request's items through the shared queue; results in input order."""
        return (await self.score_timed(items, timeout=timeout, truncation=truncation, tenant=tenant))[0]

    async def score_timed(
        self,
        items: Sequence[Item],
        *,
        timeout: float | None = None,
        truncation: Truncation | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[list[ScoreResult], Timing]:
        """Like `score`, plus the request's longest queue wait and inference time.

        Raises QueueFull when the queue cap or the tenant's quota would be exceeded, TimeoutError when
        `timeout` passes first (its items then leave the queue), and the inference error when its batch failed.
        """
        encoded = await self._tokenized(items, truncation)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise QueueFull(retry_after=1.0)
            waiting = len(self._pending)
            if waiting + len(encoded) > self.max_queue_items:
                raise QueueFull(max(0.1, waiting * self._seconds_per_item / self.workers))
            mine, quota = self._pending.depth(tenant), self._pending.quota(tenant)
            if quota is not None and mine + len(encoded) > quota:
                raise QueueFull(
                    max(0.1, mine * self._seconds_per_item / self.workers),
                    f"tenant {tenant!r} has {mine} items waiting and a quota of {quota}",
                )
            pending = [_Pending(e, loop.create_future(), loop) for e in encoded]
            self._pending.push(tenant, pending)
            self._cond.notify_all()  # the prepare thread, and the express thread when tenants compete
        futures = [p.future for p in pending]
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except BaseException:  # timeout, disconnect (cancellation) or a failed batch: free the rest
            for f in futures:
                f.cancel()
            raise
        timing = Timing(
            queue_seconds=max(t.queue_seconds for _, t in outputs),
            infer_seconds=max(t.infer_seconds for _, t in outputs),
        )
        return [result for result, _ in outputs], timing

    # -- threads -------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Pending] | None:
        policy = self.scorer.policy
        with self._cond:
            waited = False
            while True:
                # Requests that are gone (deadline, disconnect, a failed sibling batch) drop their items; the
                # event loop cancels futures at any moment, so look again after every wait.
                window = self._pending.window(self.window_items)
                if not window:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                # Tenants compete: prepare no second batch ahead, so another tenant's item that arrives
                # meanwhile waits for one batch less (a worker that takes the prepared one wakes this thread).
                if self._prepared.qsize() and self._pending.competing() and not self._stopping:
                    self._cond.wait()
                    continue
                # The device is busy: a short wait lets more items join this batch at no cost.
                busy = self._running >= self.workers
                if not waited and busy and len(self._pending) < policy.max_items:
                    waited = True
                    self._cond.wait(self.max_wait)
                    continue
                break
            if self.contended_token_budget and self._pending.competing():
                budget = min(policy.token_budget, self.contended_token_budget)
                policy = replace(policy, token_budget=budget)
            plan = policy.plan([p.encoded.tokens for p in window])
            chosen = next(b for b in plan if 0 in b)  # the batch that holds the first item in fair order
            batch = [window[i] for i in chosen]
            self._pending.take(batch, len(window))
            return batch

    def _prepare_loop(self) -> None:
        while self._slot.acquire() and (batch := self._next_batch()) is not None:
            try:
                feeds = self.scorer.collate([p.encoded for p in batch])
            except Exception as e:
                _fail(batch, e)
                self._slot.release()
                continue
            self._prepared.put((batch, feeds))
        for _ in range(self.workers):
            self._prepared.put(None)

    def _infer_loop(self) -> None:
        lower_priority(self.nice)
        while (job := self._prepared.get()) is not None:
            batch, feeds = job
            with self._cond:  # a light tenant's batch runs first: the machine is its own until it is done
                while self._express_running and self._express_session is None:
                    self._cond.wait()
            started = time.monotonic()
            with self._running_lock:
                session = self._busy_session if self._running or self._express_running else None
                self._running += 1
            self._slot.release()  # after counting this run: the next batch then waits max_wait for more items
            with self._cond:
                self._cond.notify_all()
            try:
                self._run(batch, feeds, started, session)
            finally:
                with self._running_lock:
                    self._running -= 1

    def _express_loop(self) -> None:
        """While tenants compete, the light tenants' items (a tenant with at most one batch waiting) run here
        at once, beside the batches in flight, instead of queuing behind them: a flood's batches cannot be
        interrupted, but another tenant's item need not wait for them."""
        policy = self.scorer.policy
        while True:
            with self._cond:
                while not self._stopping and not (window := self._light_window()):
                    self._cond.wait(COMPETING_SECONDS)
                if self._stopping:
                    return
                chosen = next(b for b in policy.plan([p.encoded.tokens for p in window]) if 0 in b)
                batch = [window[i] for i in chosen]
                self._pending.take(batch, len(window))
                self._express_running = True
            try:
                feeds = self.scorer.collate([p.encoded for p in batch])
                self._run(batch, feeds, time.monotonic(), self._express_session)
            except Exception as e:  # the collate failed (`_run` fails its own batches)
                _fail(batch, e)
            finally:
                with self._cond:
                    self._express_running = False
                    self._cond.notify_all()

    def _light_window(self) -> list[_Pending]:
        if not self._pending.competing():
            return []
        most = self.scorer.policy.max_items
        return self._pending.window(most, light=most)

    def _run(self, batch: list[_Pending], feeds, started: float, session=None) -> None:
        """One batch through the graph (on `session`, default the scorer's): its futures resolved (or failed)
        and its statistics reported."""
        try:
            outputs = self.scorer.forward(feeds, session)
            results = self.scorer.results([p.encoded for p in batch], outputs)
        except Exception as e:
            log.exception("inference failed for a batch of %d items", len(batch))
            _fail(batch, e)
            return
        seconds = time.monotonic() - started
        self._seconds_per_item = 0.9 * self._seconds_per_item + 0.1 * seconds / len(batch)
        for p, result in zip(batch, results, strict=True):
            timing = Timing(queue_seconds=started - p.enqueued, infer_seconds=seconds)
            p.loop.call_soon_threadsafe(_set_result, p.future, (result, timing))
        if self.on_batch:
            self.on_batch(
                BatchStats(
                    items=len(batch),
                    padded_tokens=int(feeds["input_ids"].size),
                    real_tokens=sum(p.encoded.tokens for p in batch),
                    queue_seconds=sum(started - p.enqueued for p in batch) / len(batch),
                    infer_seconds=seconds,
                    gating_cached=len(getattr(feeds, "cached", ())),
                    gating_computed=len(getattr(feeds, "fill", ())),
                )
            )


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for p in batch:
        p.loop.call_soon_threadsafe(_set_exception, p.future, error)
