"""The FastAPI application: settings, metrics and the model registry on `app.state`, the envelope middleware,
the error handlers and the routes (the map of the request flow is docs/architecture.md)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from polyreward.models import __version__
from polyreward.models.runtime.rules import RuleSet
from polyreward.service.errors import install_handlers
from polyreward.service.metrics import Metrics
from polyreward.service.middleware import envelope
from polyreward.service.profiles import Profiles
from polyreward.service.registry import Registry, Sources
from polyreward.service.routes import router
from polyreward.service.settings import Settings
from polyreward.service.tenants import Labels, tenant_for_key


def create_app(artifacts: list[Path] | Sources, settings: Settings | None = None) -> FastAPI:
    """The app serving `artifacts` (directories, or a function that finds or builds them when loading starts).

    Models load in the background once the app starts (its lifespan), so the port opens at once; `/ready`
    answers 200 when they are loaded and warm.
    """
    settings = settings or Settings()
    metrics = Metrics()
    # a bad profile or rule file stops the server before it opens a port
    profiles, rules = Profiles.load(settings.profiles), RuleSet.load(settings.rules)
    models = Registry(settings, metrics, profiles, rules)
    sources = artifacts if callable(artifacts) else lambda: list(artifacts)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        models.start(sources)
        yield
        models.stop(timeout=settings.request_timeout)
        rules.close()

    app = FastAPIOffline(  # /docs and /redoc from packaged assets: clusters are often air-gapped
        title="polyreward", version=__version__, lifespan=lifespan,
        description="Vector rewards from multi-objective reward models.",
    )  # fmt: skip
    app.state.settings, app.state.metrics, app.state.registry = settings, metrics, models
    app.state.profiles, app.state.rules = profiles, rules
    keys = [tenant_for_key(k) for k in settings.api_key_list()]
    app.state.api_keys = [(tenant, secret.encode()) for tenant, secret in keys]
    app.state.tenant_label = Labels([*settings.tenants, *(t for t, _ in keys)], settings.max_tenant_labels)
    app.middleware("http")(envelope)
    install_handlers(app)
    app.include_router(router)
    return app
