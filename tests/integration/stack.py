"""`pdserve up` in a subprocess, and what the tests need to know about it."""

import os
import signal
import socket
import time
from pathlib import Path

import grpc
import httpx

from pdserve.launch import ChildProcess, listening_address, pdserve_argv
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PDSERVE_API_KEY", None)
        if api_key:
            env["PDSERVE_API_KEY"] = api_key
        self.child = ChildProcess(
            "up", pdserve_argv("--log-level", os.environ.get("PDSERVE_TEST_LOG_LEVEL", "WARNING"),
                               "up", "--port", str(self.port), *args), cwd=ROOT, env=env)
        self.proc = self.child.proc
        self.workers: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while not any("pdserve is up" in line for line in self.child.lines):
            if not self.child.alive or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pdserve up did not come up:\n" + self.child.output()[-4000:])
            time.sleep(0.2)
        for line in self.child.lines:  # "[decode-1] pdserve decode worker listening on ..."
            address = listening_address(line)
            if address is not None and "worker listening on" in line:
                self.workers[line.split("]", 1)[0].lstrip("[")] = address

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=120, **kwargs)

    def health(self, name: str):
        stub = (decode_pb2_grpc.DecodeServiceStub if name.startswith("decode")
                else prefill_pb2_grpc.PrefillServiceStub)
        with grpc.insecure_channel(self.workers[name]) as channel:
            return stub(channel).Health(common_pb2.HealthRequest(), timeout=5)

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
