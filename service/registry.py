"""The model registry: one object that loads, warms, picks and stops the served models (the role of infinity's
`AsyncEngineArray`). Routes ask it for a model by name and never hold one themselves.

Loading runs on a thread of its own, so the HTTP port opens at once: `/health` answers while models load,
`/ready` and the scoring routes answer 503 until every model is loaded and warm (what a Kubernetes startup or
readiness probe expects). A failed load is logged, `/ready` names the error, and `on_failure` is called (the
server then exits with it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.rules import RuleSet
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.runtime.session import resolve_device
from polyreward.service.batcher import Batcher
from polyreward.service.errors import NotReady, UnknownModel
from polyreward.service.metrics import Metrics
from polyreward.service.profiles import Profiles
from polyreward.service.settings import Settings

log = logging.getLogger("polyreward.service")

State = Literal["loading", "ready", "draining", "failed"]
Sources = Callable[[], list[Path]]  # the artifact directories to serve, found (or built) when loading starts


@dataclass
class Model:
    name: str
    path: Path
    scorer: Scorer
    batcher: Batcher


class Registry:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        profiles: Profiles | None = None,
        rules: RuleSet | None = None,
    ):
        self.settings, self.metrics = settings, metrics
        self.profiles, self.rules = profiles or Profiles(), rules or RuleSet()
        self.state: State = "loading"
        self.error: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self._models: dict[str, Model] = {}
        self._loader: threading.Thread | None = None

    # -- load, warm ------------------------------------------------------------------------------------

    def start(self, sources: Sources) -> None:
        """Load and warm every model on a background thread."""
        self._loader = threading.Thread(
            target=self._load_all, args=(sources,), name="load-models", daemon=True
        )
        self._loader.start()

    def _load_all(self, sources: Sources) -> None:
        try:
            paths = sources()
            log.info("loading %d model(s); /ready answers 503 until they are loaded and warm", len(paths))
            for path in paths:
                self._add(self._load(path))
        except Exception as e:  # a damaged artifact, a bad setting: the server cannot serve
            self.error = str(e) if isinstance(e, PolyrewardError) else f"{type(e).__name__}: {e}"
            self.state = "failed"
            log.error("loading models failed: %s", self.error)
            if self.on_failure:
                self.on_failure(self.error)
            return
        if self.state == "loading":
            self.state = "ready"
            log.info("ready: serving %s", ", ".join(self._models))

    def _load(self, path: Path) -> Model:
        s, started = self.settings, time.perf_counter()
        device = resolve_device(s.device)
        run = s.execution(device)
        scorer = Scorer(
            path, precision=s.precision, device=device, token_budget=s.token_budget,
            max_batch_items=s.max_batch_items, threads=run.threads, spin=run.spin,
            nice=run.nice, gating_cache=s.gating_cache_items,
        )  # fmt: skip
        name = scorer.manifest.name
        self.rules.check(scorer.objectives)
        self.profiles.check(scorer.manifest, self.rules.names)
        if name in self._models:
            raise PolyrewardError(
                f"{path}: another artifact is also named {name!r}; models need distinct names"
            )
        batcher = Batcher(
            scorer, max_queue_items=s.max_queue_items, max_wait=s.max_wait_ms / 1000, workers=run.workers,
            tenants=s.tenants, contended_token_budget=s.tenant_token_budget, nice=run.nice,
            busy_threads=run.busy_threads,
            on_batch=self.metrics.on_batch(name),
        )  # fmt: skip
        batcher.start()
        scorer.score([PromptItem(prompt="warm up", response="ok")])  # the first run allocates; not a user's
        self.rules.warm()
        log.info(
            "serving %s %s from %s: %s graph on %s, %d objectives, %d worker(s), token budget %d (%.1fs)",
            name, scorer.manifest.version, path, scorer.precision, scorer.providers[0], len(scorer.objectives),
            run.workers, scorer.policy.token_budget, time.perf_counter() - started,
        )  # fmt: skip
        return Model(name, path, scorer, batcher)

    def _add(self, model: Model) -> None:
        self._models[model.name] = model
        m = model.scorer.manifest
        self.metrics.model_info.labels(
            model.name, m.version, model.scorer.precision, model.scorer.providers[0]
        ).set(1)
        self.metrics.queue_capacity.labels(model.name).set(self.settings.max_queue_items)

    # -- pick --------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def not_ready_reason(self) -> str:
        if self.state == "failed":
            return f"loading the models failed: {self.error}"
        return "models are loading" if self.state == "loading" else "the server is draining"

    def pick(self, name: str | None) -> Model:
        """The named model, or the first one; raises NotReady while loading, UnknownModel for a wrong name.
        While draining, requests are still served."""
        if self.state in ("loading", "failed"):
            raise NotReady(self.not_ready_reason())
        if name is None:
            return next(iter(self._models.values()))
        if name not in self._models:
            raise UnknownModel(f"model: {name!r} is not loaded (loaded: {', '.join(self._models)})")
        return self._models[name]

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self._models.values()))

    @property
    def names(self) -> list[str]:
        return list(self._models)

    # -- stop --------------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Keep serving, but answer /ready with 503 (load balancers take the server out of rotation)."""
        if self.state == "ready":
            self.state = "draining"

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued item of every model, then end their threads (waits for a load in progress)."""
        if self._loader is not None:
            self._loader.join(timeout)
        if self.state != "failed":
            self.state = "draining"
        for model in self:
            model.batcher.stop(timeout=timeout)
