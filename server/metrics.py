"""The gateway's Prometheus metrics, measured where the client sees them.

Names follow DESIGN.md: prefix `pdserve_`, base units, latency histograms starting at
1 ms. Each request gets a recorder that turns its events (queued, each token, prefill
report, finish) into observations exactly once.
"""

import asyncio
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
ENDPOINTS = ("completions", "chat.completions", "responses", "responses.retrieve",
             "responses.delete", "responses.input_items")
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
WORKER_LABELS = ("worker", "role")


class GatewayMetrics:
    """Owns its registry (not the global one) so tests and several apps never collide."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.registry = r = CollectorRegistry()
        # process_resident_memory_bytes, process_open_fds, ...: what a soak bounds.
        ProcessCollector(registry=r)
        r.register(_AsyncioTasks())

        def hist(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"pdserve_{name}", doc, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token sent.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens.")
        self.tpot = hist("time_per_output_token_seconds",
                         "(e2e - TTFT) / (output tokens - 1) per request.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = Histogram("pdserve_request_queue_time_seconds",
                               "Time waiting for admission, by request priority (as given, "
                               "or '<-20'/'>20' beyond).", ["priority"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = hist("prefill_time_seconds", "Prefill compute (prefill worker).")
        self.kv_time = hist("kv_transfer_seconds", "KV transfer, first chunk to ack.")
        self.prompt_hist = hist("request_prompt_tokens", "Prompt tokens per request.",
                                TOKEN_BUCKETS)
        self.gen_hist = hist("request_generation_tokens", "Output tokens per request.",
                             TOKEN_BUCKETS)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved.", registry=r)
        self.kv_skipped = Counter("pdserve_kv_transfer_skipped_bytes",
                                  "KV bytes not moved: the decode worker held them cached.",
                                  registry=r)
        self.cached_tokens = Counter("pdserve_prompt_cached_tokens",
                                     "Prompt tokens whose KV came from a prefix cache.",
                                     registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens.", registry=r)
        self.gen_tokens = Counter("pdserve_generation_tokens", "Output tokens.", registry=r)
        self.requests = Counter("pdserve_requests", "Finished requests.", ["finish_reason"],
                                registry=r)
        self.errors = Counter("pdserve_request_errors", "Rejected or failed requests.",
                              ["status"], registry=r)
        # Series exist at zero from the start, so rate() and dashboards see them before
        # the first error of each kind.
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(reason)
        for status in ("400", "401", "404", "413", "429", "500", "502", "503", "504"):
            self.errors.labels(status)
        self.endpoints = Counter("pdserve_endpoint_requests", "API requests received, by "
                                 "endpoint (before validation).", ["endpoint"], registry=r)
        for name in ENDPOINTS:
            self.endpoints.labels(name)
        self.queue.labels("0")
        self.refusals = Counter("pdserve_admission_refusals", "Requests not admitted, by "
                                "reason: queue_full, expected_wait (refused at once: the "
                                "wait would pass --max-queue-wait), queue_wait (waited "
                                "--max-queue-wait), client_gone (left while queued).",
                                ["reason"], registry=r)
        for reason in ("queue_full", "expected_wait", "queue_wait", "client_gone"):
            self.refusals.labels(reason)
        self.migrations = Counter(
            "pdserve_migrations", "Requests moved to another decode worker mid-stream, "
            "after the one serving them failed or stopped answering.", registry=r)
        self.restarts = Counter(
            "pdserve_worker_restarts", "Times a new worker process was seen answering at a "
            "worker's address.", WORKER_LABELS, registry=r)
        self.running = Gauge("pdserve_requests_running", "Requests generating.", registry=r)
        self.waiting = Gauge("pdserve_requests_waiting", "Requests waiting for admission.",
                             registry=r)

        def worker_gauge(name, doc):
            return Gauge(f"pdserve_{name}", doc, WORKER_LABELS, registry=r)

        self.worker_gauges = {
            "usage": worker_gauge("kv_cache_usage_ratio", "Share of KV blocks in use."),
            "free": worker_gauge("kv_blocks_free", "Free KV blocks."),
            "batch": worker_gauge("batch_size", "Sequences in the running batch."),
            "waiting": worker_gauge("worker_waiting", "Sequences waiting on the worker."),
            "queued": worker_gauge("worker_queued_prompt_tokens", "Prompt tokens queued."),
            "up": worker_gauge("worker_up", "1 when the worker answers Health."),
            "prefix_hit": worker_gauge("prefix_cache_hit_ratio",
                                       "Share of prompt tokens found in the worker's prefix "
                                       "cache, since it started."),
        }

    def request(self, prompt_tokens: int, priority: int = 0) -> "RequestRecorder":
        return RequestRecorder(self, prompt_tokens, priority)

    def worker_health(self, address: str, role: str, up: bool, free_blocks: int,
                      total_blocks: int, running: int, waiting: int,
                      queued_prompt_tokens: int, prefix_hit_ratio: float = 0.0) -> None:
        g = {k: v.labels(address, role) for k, v in self.worker_gauges.items()}
        self.restarts.labels(address, role)  # the series exists at 0 from the first report
        g["prefix_hit"].set(prefix_hit_ratio)
        g["up"].set(1 if up else 0)
        g["usage"].set(1 - free_blocks / total_blocks if total_blocks else 0)
        g["free"].set(free_blocks)
        g["batch"].set(running)
        g["waiting"].set(waiting)
        g["queued"].set(queued_prompt_tokens)

    def worker_restarted(self, address: str, role: str) -> None:
        self.restarts.labels(address, role).inc()

    def endpoint(self, name: str) -> None:
        self.endpoints.labels(name).inc()

    def migrated(self) -> None:
        self.migrations.inc()

    def forget_worker(self, address: str, role: str) -> None:
        for gauge in (*self.worker_gauges.values(), self.restarts):
            try:
                gauge.remove(address, role)
            except KeyError:
                pass

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def set_waiting(self, n: int) -> None:
        self.waiting.set(n)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def rejected(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _AsyncioTasks:
    """pdserve_asyncio_tasks: the tasks of the event loop that renders the metrics. The
    gateway renders /metrics in an async route, so on its loop's own thread, where
    asyncio.all_tasks() is safe (it is not from another thread); rendered with no loop
    running, the gauge is left out rather than read from a loop it does not own."""

    def collect(self):
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # no running loop
            return
        family = GaugeMetricFamily("pdserve_asyncio_tasks", "Tasks of the event loop "
                                   "(the scrape's own included): a count that keeps "
                                   "growing while idle is a leak.")
        family.add_metric([], len(tasks))
        yield family


PRIORITY_LABELS = 20  # priorities beyond +-this share a label: the series stay bounded


def priority_label(priority: int) -> str:
    if priority > PRIORITY_LABELS:
        return f">{PRIORITY_LABELS}"
    if priority < -PRIORITY_LABELS:
        return f"<-{PRIORITY_LABELS}"
    return str(priority)


class RequestRecorder:
    """One request's events, turned into observations; created when the request arrives."""

    def __init__(self, metrics: GatewayMetrics, prompt_tokens: int, priority: int = 0):
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.priority = priority_label(priority)
        self.start = metrics.clock()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def queued(self, seconds: float) -> None:
        self.m.queue.labels(self.priority).observe(seconds)

    def token(self) -> None:
        now = self.m.clock()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.tokens += 1
        self.m.gen_tokens.inc()

    def prefill(self, compute_seconds: float, transfer_seconds: float, kv_bytes: int,
                kv_bytes_skipped: int = 0) -> None:
        self.m.prefill_time.observe(compute_seconds)
        self.m.kv_time.observe(transfer_seconds)
        self.m.kv_bytes.inc(kv_bytes)
        self.m.kv_skipped.inc(kv_bytes_skipped)

    def cached(self, tokens: int) -> None:
        self.m.cached_tokens.inc(tokens)

    def finish(self, reason: str) -> None:
        # Idempotent: callers finish from the stream and again from cleanup ("abort").
        if self.done:
            return
        self.done = True
        now = self.m.clock()
        self.m.requests.labels(reason).inc()
        self.m.prompt_tokens.inc(self.prompt_tokens)
        self.m.prompt_hist.observe(self.prompt_tokens)
        self.m.gen_hist.observe(self.tokens)
        # Every finished request counts in e2e, even one that failed before its first token.
        self.m.e2e.observe(now - self.start)
        if self.tokens > 1:
            # (e2e - ttft) / (tokens - 1): the first token's wait is TTFT's business.
            self.m.tpot.observe((now - self.first) / (self.tokens - 1))
