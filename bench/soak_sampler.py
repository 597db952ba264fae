"""What the soak samples of one process: RSS and open fds (from /proc when the process is
on this machine, else from its process_* metrics), asyncio tasks, a worker's KV blocks
in use and the gateway's requests in flight (from its /metrics).

A sample names its process's lifetime ("pid 123", or the process start time read from
its metrics), so a restarted worker starts a series of its own (bench.soak_bounds).
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the soak started
    phase: str
    process: str
    lifetime: str
    rss_bytes: int | None
    fds: int | None
    asyncio_tasks: float | None
    kv_blocks_in_use: float | None  # workers
    in_flight: float | None  # the gateway: running + waiting for admission


@dataclass(frozen=True)
class Probe:
    """One process of the stack: how to find its pid (None: not on this machine, or not
    running now) and its /metrics URL (None: none known now)."""

    name: str
    pid: Callable[[], int | None]
    metrics_url: Callable[[], str | None]
    local: bool = True  # on this machine: no pid now means not running (or not known yet)


def proc_rss(pid: int) -> int | None:
    """RSS of a live process; None once it is exiting or a zombie. A process that was
    killed gives up its memory before its files (the kernel's do_exit), so reading fds
    first and this second never pairs a dead process's 0 fds with a live RSS."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                return None
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """Each metric's samples summed over their labels; {} when the scrape fails (a
    worker being restarted)."""
    try:
        response = httpx.get(url, headers=headers or {}, timeout=5)
        response.raise_for_status()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                values[s.name] = values.get(s.name, 0.0) + s.value
        return values
    except (httpx.HTTPError, ValueError):
        return {}


def sample(probe: Probe, t: float, phase: str, headers: dict | None = None) -> dict | None:
    """One sample of `probe` as a dict (keys of bench.soak_bounds.METRICS, None where
    unknown), or None when the process is not there."""
    pid = probe.pid()
    url = probe.metrics_url()
    metrics = scrape(url, headers) if url else {}
    if pid is not None:
        fds = proc_fds(pid)
        rss, lifetime = proc_rss(pid), f"pid {pid}"
        if rss is None or not fds:  # it exited between the look-up and the reads
            return None
    elif not probe.local and "process_start_time_seconds" in metrics:
        rss = metrics.get("process_resident_memory_bytes")
        fds = metrics.get("process_open_fds")
        lifetime = f"started {metrics['process_start_time_seconds']:.0f}"
    else:
        return None
    blocks = None
    if "pdserve_kv_blocks_total" in metrics and "pdserve_worker_info" in metrics:
        blocks = metrics["pdserve_kv_blocks_total"] - metrics["pdserve_kv_blocks_free"]
    in_flight = None
    if "pdserve_requests_running" in metrics:
        in_flight = metrics["pdserve_requests_running"] + metrics.get(
            "pdserve_requests_waiting", 0.0)
    return asdict(Sample(round(t, 3), phase, probe.name, lifetime, rss, fds,
                         metrics.get("pdserve_asyncio_tasks"), blocks, in_flight))


def metrics_probes(url: str, worker_metrics_urls: list[str]) -> list[Probe]:
    """Probes of a stack on another machine (or not ours to look into): the gateway and
    each worker only through its /metrics."""
    probes = [Probe("gateway", lambda: None, lambda: f"{url}/metrics", local=False)]
    for i, worker in enumerate(worker_metrics_urls, 1):
        probes.append(Probe(f"worker-{i}", lambda: None, lambda worker=worker: worker,
                            local=False))
    return probes
