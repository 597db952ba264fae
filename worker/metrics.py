"""Prometheus metrics of one worker process, served over HTTP on `--metrics-port`.

The load gauges are read from the engine loop's stats snapshot at scrape time, so a
scrape never waits for the engine thread and the step loop pays nothing for them; the
step histogram and counters are fed by the loop's step observer (a few microseconds).
"""

import asyncio
import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("pdserve.worker")

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TASK_COUNT_SECONDS = 1.0  # how often the event loop counts its own tasks


class _LoadCollector:
    """The engine's load as gauges, labelled with the worker's role."""

    def __init__(self, role: str, engine_loop, model: str):
        self.role = role
        self.loop = engine_loop
        self.model = model

    def collect(self):
        stats = self.loop.stats
        used = stats.total_blocks - stats.free_blocks
        gauges = (
            ("kv_cache_usage_ratio", "Share of KV blocks in use.",
             used / stats.total_blocks if stats.total_blocks else 0.0),
            ("kv_blocks_free", "Free KV blocks.", stats.free_blocks),
            ("kv_blocks_total", "KV blocks in the cache.", stats.total_blocks),
            ("batch_size", "Sequences in the running batch.", stats.running),
            ("worker_waiting", "Sequences waiting to join the batch.", stats.waiting),
            ("worker_queued_prompt_tokens", "Prompt tokens not yet computed.",
             stats.queued_prompt_tokens),
            ("kv_blocks_cached", "Idle KV blocks kept for the prefix cache.",
             stats.idle_blocks),
            ("prefix_cache_hit_ratio", "Share of prompt tokens found in the prefix cache.",
             stats.prefix_hit_tokens / stats.prefix_queried_tokens
             if stats.prefix_queried_tokens else 0.0),
            ("spec_acceptance_ratio", "Share of speculatively drafted tokens the model "
             "accepted, since the worker started.",
             stats.spec_accepted_tokens / stats.spec_drafted_tokens
             if stats.spec_drafted_tokens else 0.0),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"pdserve_{name}", doc, labels=["role"])
            family.add_metric([self.role], value)
            yield family
        counters = (
            ("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_queried_tokens),
            ("prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.",
             stats.prefix_hit_tokens),
            ("prefix_cache_evictions", "Cached KV blocks evicted for room.",
             stats.prefix_evictions),
            ("spec_drafts", "Speculative drafts verified (one sequence's draft in one step).",
             stats.spec_drafts),
            ("spec_draft_tokens", "Tokens drafted by speculative decoding.",
             stats.spec_drafted_tokens),
            ("spec_accepted_tokens", "Drafted tokens the model accepted (each one a token "
             "gained without a step of its own).", stats.spec_accepted_tokens),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(f"pdserve_{name}", doc, labels=["role"])
            family.add_metric([self.role], value)
            yield family
        info = GaugeMetricFamily("pdserve_worker_info", "Constant 1; the worker's role and "
                                 "model as labels.", labels=["role", "model"])
        info.add_metric([self.role, self.model], 1)
        yield info


class _AsyncioTasks:
    """pdserve_asyncio_tasks of the worker's event loop. /metrics is served from another
    thread, and asyncio.all_tasks() is not safe off the loop's thread (it iterates a
    set the loop changes), so the loop counts its own tasks every TASK_COUNT_SECONDS
    with a timer (a callback, not a task: it does not count itself) and the scrape
    reads the last count, at most that old, and never waits for a busy loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.count: int | None = None
        loop.call_soon_threadsafe(self._refresh)

    def _refresh(self) -> None:
        self.count = len(asyncio.all_tasks(self.loop))
        self.loop.call_later(TASK_COUNT_SECONDS, self._refresh)

    def collect(self):
        if self.count is None:
            return
        family = GaugeMetricFamily("pdserve_asyncio_tasks", "Tasks of the event loop, "
                                   f"counted every {TASK_COUNT_SECONDS:g} s: a count that "
                                   "keeps growing while idle is a leak.")
        family.add_metric([], self.count)
        yield family


class WorkerMetrics:
    """Owns its registry: several workers in one test process never collide."""

    def __init__(self, role: str, engine_loop, model: str):
        self.role = role
        self.registry = r = CollectorRegistry()
        r.register(_LoadCollector(role, engine_loop, model))
        r.register(_AsyncioTasks(engine_loop.loop))
        # process_resident_memory_bytes, process_open_fds, ...: what a soak bounds.
        ProcessCollector(registry=r)
        self.step_seconds = Histogram("pdserve_engine_step_seconds", "One model step.",
                                      ["role"], buckets=STEP_BUCKETS, registry=r)
        self.step_batch = Histogram("pdserve_engine_step_sequences",
                                    "Sequences that got a token in one step.", ["role"],
                                    buckets=BATCH_BUCKETS, registry=r)
        # More than the sequences where speculative drafts were accepted.
        self.step_tokens = Histogram("pdserve_engine_step_tokens",
                                     "Tokens emitted by one step.", ["role"],
                                     buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("pdserve_worker_generated_tokens",
                              "Tokens sampled on this worker.", ["role"], registry=r)
        self.finished = Counter("pdserve_worker_requests",
                                "Sequences that finished in a model step.",
                                ["role", "finish_reason"], registry=r)
        # Every series exists from the first scrape (at zero), so dashboards and rate()
        # see a worker before its first request.
        for metric in (self.step_seconds, self.step_batch, self.step_tokens, self.tokens):
            metric.labels(role)
        for reason in ("stop", "length", "abort", "error", "prefilled"):
            self.finished.labels(role, reason)
        engine_loop.step_observers.append(self.observe_step)

    def observe_step(self, seconds: float, outputs) -> None:
        tokens = sum(1 for out in outputs if out.token_id is not None)
        sequences = len({(out.request_id, out.sample_index) for out in outputs
                         if out.token_id is not None})
        self.step_seconds.labels(self.role).observe(seconds)
        self.step_batch.labels(self.role).observe(sequences)
        self.step_tokens.labels(self.role).observe(tokens)
        if tokens:
            self.tokens.labels(self.role).inc(tokens)
        for out in outputs:
            if out.finish_reason is not None:
                self.finished.labels(self.role, str(out.finish_reason)).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a daemon thread; returns the bound port (port 0: any)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = httpd.server_address[1]
        # Tests and `pdserve up` read this line to learn the port (with port 0).
        print(f"pdserve {self.role} worker metrics on http://{host}:{bound}/metrics",
              flush=True)
        return bound
