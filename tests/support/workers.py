"""Real worker processes on loopback and the calls a gateway makes to them.

Each worker is started as `python -m pdserve prefill|decode --port 0 ...`; pdserve.launch
reads its port from the line it prints once it listens. A worker's gRPC security (token,
mutual TLS) is given as its PDSERVE_ variables, and the test's own channel to it carries
the same, as the gateway's would.
"""

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.sampling_params import SamplingParams
from pdserve.env_flags import PREFIX
from pdserve.launch import ChildProcess, pdserve_argv
from pdserve_config.security import NO_SECURITY, SecurityConfig
from pdserve_proto.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from server.events import FINISH_REASONS
from worker.convert import params_to_proto

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120


def security_env(security: SecurityConfig, environ=os.environ) -> dict[str, str]:
    """`environ` with `security` as the PDSERVE_ variables of its flags, and none of
    those variables from the test's own environment."""
    env = dict(environ, PYTHONUNBUFFERED="1")
    for f in dataclasses.fields(SecurityConfig):
        env.pop(PREFIX + f.name.upper(), None)
        if getattr(security, f.name):
            env[PREFIX + f.name.upper()] = getattr(security, f.name)
    return env


class Worker:
    def __init__(self, role: str, *args: str, security: SecurityConfig = NO_SECURITY,
                 wait: bool = True):
        """Started, and with `wait` listening (else call `ready()`)."""
        self.role = role
        self.security = security
        self.child = ChildProcess(
            role, pdserve_argv("--log-level", os.environ.get("PDSERVE_TEST_LOG_LEVEL", "INFO"),
                               role, "--port", "0", "--num-threads", "1", *args),
            cwd=ROOT, env=security_env(security))
        self.proc = self.child.proc
        if wait:
            self.ready()

    def ready(self) -> "Worker":
        """Once it listens: its address and a channel to it."""
        self.address = self.child.wait_listening(START_TIMEOUT)
        self.channel = self.security.channel(self.address)
        stub = decode_pb2_grpc.DecodeServiceStub if self.role == "decode" else \
            prefill_pb2_grpc.PrefillServiceStub
        self.stub = stub(self.channel)
        return self

    def health(self):
        return self.stub.Health(common_pb2.HealthRequest(), timeout=10)

    def wait_idle(self, timeout: float = 10.0):
        """Health once every block is free again and nothing is queued or leased."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            idle = (h.free_kv_blocks == h.total_kv_blocks and h.running == 0
                    and h.waiting == 0 and h.leases == 0)
            if idle or time.monotonic() > deadline:
                return h
            time.sleep(0.05)

    def kill(self) -> None:
        self.child.kill()

    def stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        self.child.stop(timeout=15)


def start_workers(*specs: tuple[str, ...]) -> list[Worker]:
    """Workers of (role, *args) started side by side, each on one thread, then waited
    for: a start is mostly one thread loading and quantizing the model, so two on two
    cores take about as long as one. If one fails to start, all are stopped."""
    workers = [Worker(*spec, wait=False) for spec in specs]
    try:
        return [worker.ready() for worker in workers]
    except BaseException:
        for worker in workers:
            worker.stop()
        raise


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prefill: object = None
    finished: object = None
    reserved: object = None


def gen_request(rid: str, prompt: list[int], params: SamplingParams, remote: bool,
                lease_timeout: float = 0.0):
    return decode_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params),
        remote_prefill=remote, lease_timeout_seconds=lease_timeout)


def colocated(decode: Worker, rid: str, prompt: list[int], params: SamplingParams) -> Result:
    result = Result()
    for msg in decode.stub.Generate(gen_request(rid, prompt, params, False), timeout=300):
        _collect(result, msg)
    return result


def disaggregated(prefill: Worker, decode: Worker, rid: str, prompt: list[int],
                  params: SamplingParams) -> Result:
    """The gateway's path: reserve on decode, prefill with the lease, then stream."""
    stream = decode.stub.Generate(gen_request(rid, prompt, params, True), timeout=300)
    reserved = next(stream).reserved
    result = Result(reserved=reserved)
    result.prefill = prefill.stub.Prefill(prefill_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params),
        decode_address=decode.address, lease_id=reserved.lease_id,
        decode_cached_tokens=reserved.cached_tokens), timeout=300)
    result.tokens.append(result.prefill.first_token.token_id)
    for msg in stream:
        _collect(result, msg)
    return result


def _collect(result: Result, msg) -> None:
    if msg.HasField("token"):
        result.tokens.append(msg.token.token_id)
    elif msg.HasField("finished"):
        result.finished = msg.finished
        result.finish_reason = FINISH_REASONS[msg.finished.finish_reason]
