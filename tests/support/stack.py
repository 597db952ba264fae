"""`pdserve up` in a subprocess, and what the tests need to know about it."""

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.launch import ChildProcess, listening_address, metrics_address, pdserve_argv
from pdserve_config.security import NO_SECURITY, SecurityConfig
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.support.workers import security_env

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_transfer_bytes(url: str) -> float:
    """The KV bytes a gateway has seen moved from prefill to decode workers."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pdserve_kv_transfer_bytes_total")


class Stack:
    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 240,
                 security: SecurityConfig = NO_SECURITY, wait: bool = True):
        """`security`: the gRPC token and TLS of every process, and of the test's own
        channels to the workers. With `wait`, returns once it is up (else call `up()`)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.security = security
        env = security_env(security)
        env.pop("PDSERVE_API_KEY", None)
        if api_key:
            env["PDSERVE_API_KEY"] = api_key
        self.child = ChildProcess(
            "up", pdserve_argv("--log-level", os.environ.get("PDSERVE_TEST_LOG_LEVEL", "WARNING"),
                               "up", "--port", str(self.port), *args), cwd=ROOT, env=env)
        self.proc = self.child.proc
        self.workers: dict[str, str] = {}
        self._deadline = time.monotonic() + timeout
        if wait:
            self.up()

    def up(self) -> "Stack":
        """Once `pdserve up` says it is up: the workers' addresses."""
        while not any("pdserve is up" in line for line in self.child.lines):
            if not self.child.alive or time.monotonic() > self._deadline:
                self.stop()
                raise RuntimeError("pdserve up did not come up:\n" + self.child.output()[-4000:])
            time.sleep(0.2)
        for line in self.child.lines:  # "[decode-1] pdserve decode worker listening on ..."
            address = listening_address(line)
            if address is not None and "worker listening on" in line:
                self.workers[line.split("]", 1)[0].lstrip("[")] = address
        return self

    def worker_metrics(self, name: str) -> dict[str, float]:
        """Worker `name`'s /metrics as scrape() gives them (a stack started with
        --worker-metrics; a restarted worker prints its new port, the last one counts)."""
        urls = [metrics_address(line) for line in self.child.lines
                if line.startswith(f"[{name}]") and metrics_address(line)]
        assert urls, f"{name} printed no metrics address (is --worker-metrics on?)"
        return scrape(urls[-1].removesuffix("/metrics"))

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=120, **kwargs)

    def health(self, name: str):
        stub = (decode_pb2_grpc.DecodeServiceStub if name.startswith("decode")
                else prefill_pb2_grpc.PrefillServiceStub)
        with self.security.channel(self.workers[name]) as channel:
            return stub(channel).Health(common_pb2.HealthRequest(), timeout=5)

    def complete_disaggregated(self, model: str, count: int = 3) -> None:
        """`count` short completions, each prefilled remotely (with a stack started with
        --local-prefill-max-tokens 1): KV crossed from prefill to decode for them."""
        before = kv_transfer_bytes(self.url)
        with self.client() as http:
            for i in range(count):
                r = http.post("/v1/completions", json={
                    "model": model, "prompt": f"Request {i}: the river and the stone",
                    "max_tokens": 4, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 4
        assert kv_transfer_bytes(self.url) > before

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Every worker's Health once all its blocks are free (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            reports = {name: self.health(name) for name in self.workers}
            idle = all(h.free_kv_blocks == h.total_kv_blocks and h.running == 0
                       and h.waiting == 0 and h.leases == 0 for h in reports.values())
            if idle or time.monotonic() > deadline:
                return reports
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        return self.child.stop(timeout, sig)


@contextlib.contextmanager
def colocated_and_1p1d(*args: str):
    """{"colocated": a stack of one decode worker, "1P1D": one prefill and one decode
    worker with every prompt prefilled remotely}, both with `args`; stopped at exit."""
    started = {}
    try:  # side by side: a start is mostly one process loading the model
        started["colocated"] = Stack("--prefill", "0", "--decode", "1", *args, wait=False)
        started["1P1D"] = Stack("--prefill", "1", "--decode", "1",
                                "--local-prefill-max-tokens", "0", *args, wait=False)
        for stack in started.values():
            stack.up()
        yield started
    finally:
        for stack in started.values():
            stack.stop()


class Gateway:
    """A gateway process in front of an existing decode worker."""

    def __init__(self, decode: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child = ChildProcess("gateway", pdserve_argv(
            "--log-level", "WARNING", "gateway", "--port", str(self.port), "--decode", decode,
            *args), cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready").status_code == 200:
                    return
            assert self.child.alive and time.monotonic() < deadline, self.child.output()[-2000:]
            time.sleep(0.2)

    def stop(self) -> None:
        self.child.stop(10)


def pid_listening_on(address: str) -> int:
    """The process listening on `address` (host:port) on this machine, found from
    /proc/net/tcp* and the processes' socket descriptors."""
    port = int(address.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in list(f)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    raise LookupError(f"nothing listens on {address}")


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """condition()'s first true value, polled; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


def metric(url: str, name: str, **labels) -> float:
    """The sum of a gateway's samples of `name` that carry `labels`."""
    return sum(v for k, v in scrape(url).items() if k.startswith(name + "{")
               and all(f'"{key}": "{value}"' in k for key, value in labels.items()))


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """The gateway's /metrics as {name + JSON labels: value}."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10).text
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
