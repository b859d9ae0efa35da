"""Prometheus metrics, all prefixed `polyreward_` (README, "Serve"), in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from polyreward.service.batcher import BatchStats

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("polyreward_requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "polyreward_request_duration_seconds", "request latency", ["route"], buckets=_LATENCY, registry=r
        )
        self.queue_seconds = Histogram(
            "polyreward_queue_duration_seconds", "time items wait for a batch", ["model"], buckets=_LATENCY,
            registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "polyreward_inference_duration_seconds", "time one batch takes", ["model"], buckets=_LATENCY,
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "polyreward_batch_size", "items per batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "polyreward_batch_padded_tokens", "padded tokens per batch", ["model"],
            buckets=(256, 1024, 4096, 8192, 16384, 32768, 65536), registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "polyreward_padding_ratio", "padded / real tokens per batch", ["model"],
            buckets=(1, 1.1, 1.25, 1.5, 2, 3, 5), registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("polyreward_queue_depth", "items waiting", ["model"], registry=r)
        self.queue_capacity = Gauge(
            "polyreward_queue_capacity", "queued items before 429 (max_queue_items)", ["model"], registry=r
        )
        self.items = Counter("polyreward_items_scored", "items scored", ["model"], registry=r)
        self.tokens = Counter("polyreward_tokens_scored", "real tokens scored", ["model"], registry=r)
        self.gating_cache = Counter(
            "polyreward_gating_cache_items", "items whose gating weights came from the prompt cache (hit) "
            "or from a gating pass over their prompt (miss)", ["model", "result"], registry=r,
        )  # fmt: skip
        # per tenant (README, tenants): the named ones and the first max_tenant_labels others, then "other"
        self.tenant_items = Counter("polyreward_tenant_items_scored", "items scored", ["tenant"], registry=r)
        self.tenant_queue_seconds = Histogram(
            "polyreward_tenant_queue_duration_seconds", "a request's longest queue wait", ["tenant"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.tenant_rejections = Counter(
            "polyreward_tenant_rejections", "requests answered 429 (queue cap or tenant quota)", ["tenant"],
            registry=r,
        )  # fmt: skip
        self.truncations = Counter("polyreward_truncations", "items truncated", ["model"], registry=r)
        self.rejections = Counter("polyreward_rejections", "requests refused", ["reason"], registry=r)
        self.rule_failures = Counter(
            "polyreward_rule_failures", "rule checks that did not finish (scored 0)", ["rule"], registry=r
        )
        self.unrecognized_queries = Counter(
            "polyreward_unrecognized_queries", "/get_reward queries in no known chat format", registry=r
        )
        self.model_info = Gauge(
            "polyreward_model_info",
            "loaded models",
            ["model", "version", "precision", "provider"],
            registry=r,
        )

    def on_batch(self, model: str):
        def record(stats: BatchStats) -> None:
            self.batch_size.labels(model).observe(stats.items)
            self.batch_tokens.labels(model).observe(stats.padded_tokens)
            self.padding_ratio.labels(model).observe(stats.padded_tokens / max(stats.real_tokens, 1))
            self.inference_seconds.labels(model).observe(stats.infer_seconds)
            self.queue_seconds.labels(model).observe(stats.queue_seconds)
            self.items.labels(model).inc(stats.items)
            self.tokens.labels(model).inc(stats.real_tokens)
            if stats.gating_cached or stats.gating_computed:
                self.gating_cache.labels(model, "hit").inc(stats.gating_cached)
                self.gating_cache.labels(model, "miss").inc(stats.gating_computed)

        return record
