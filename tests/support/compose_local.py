"""Run deploy/docker-compose.yml's pdserve services as local processes.

There is no Docker engine here, so each replica runs as a process with the service's
own command (after the image's ENTRYPOINT, read from deploy/Dockerfile) and environment.
Every replica gets its own loopback address (127.a.b.c), so replicas keep the ports the
compose file gives them, and a service name in an argument (`decode:50052`) becomes the
list of its replicas' addresses, as compose's DNS would answer it.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
START_TIMEOUT = 180
# Offsets of each service's replicas in the run's 127.a.b.0/24.
_HOST_BASE = {"gateway": 10, "prefill": 20, "decode": 30, "prometheus": 40}


def load_compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def image_entrypoint() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR}, from `variables` only."""
    def sub(m):
        name, default = m.group(1), m.group(3) or ""
        return variables.get(name) or default
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


@dataclass
class Replica:
    service: str
    index: int
    host: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    proc: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def healthy(self) -> bool:
        """The service's compose healthcheck, run as docker would run it."""
        result = subprocess.run(self.healthcheck, env=self.env, capture_output=True,
                                timeout=30)
        return result.returncode == 0

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.service}[{self.index}] did not become healthy:\n"
                           + "".join(self.output)[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalCompose:
    def __init__(self, replicas: dict[str, int]):
        self.compose = load_compose()
        self.net = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        self.replicas: dict[str, list[Replica]] = {}
        for service, count in replicas.items():
            self.replicas[service] = [self._replica(service, i, count)
                                      for i in range(count)]
        # Built after every host is known: a service name stands for all its replicas.
        for reps in self.replicas.values():
            for r in reps:
                r.argv = [self._map_names(a) for a in r.argv]

    def host(self, service: str, index: int) -> str:
        return f"{self.net}.{_HOST_BASE[service] + index + 1}"

    def _replica(self, service: str, index: int, count: int) -> Replica:
        spec = self.compose["services"][service]
        host = self.host(service, index)
        entry = image_entrypoint()
        # The image's `pdserve` is this environment's console script.
        program = [str(Path(sys.executable).parent / entry[0]), *entry[1:]]
        argv = program + [host if a == "0.0.0.0" else a for a in spec["command"]]
        # Only the compose file's PDSERVE_ settings apply; PDSERVE_CACHE (set by the
        # image to its converted model) stays this machine's own.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PDSERVE_") or k == "PDSERVE_CACHE"}
        for key, value in spec.get("environment", {}).items():
            env[key] = interpolate(str(value), {}).replace("127.0.0.1", host)
        check = spec["healthcheck"]["test"]
        assert check[0] == "CMD", check
        healthcheck = [str(Path(sys.executable).parent / check[1]), *check[2:]]
        return Replica(service, index, host, argv, env, healthcheck)

    def _map_names(self, arg: str) -> str:
        m = re.fullmatch(r"(\w+):(\d+)", arg)
        if not m or m.group(1) not in self.replicas:
            return arg
        return ",".join(f"{r.host}:{m.group(2)}" for r in self.replicas[m.group(1)])

    def up(self) -> None:
        """Start in depends_on order: every worker healthy before the gateway starts."""
        workers = [r for s in ("prefill", "decode") for r in self.replicas.get(s, [])]
        for r in workers:
            r.start()
        for r in workers:
            r.wait_healthy()
        for r in self.replicas["gateway"]:
            r.start()
            r.wait_healthy()

    def down(self) -> None:
        for reps in self.replicas.values():
            for r in reps:
                r.stop()

    def gateway_url(self) -> str:
        gw = self.replicas["gateway"][0]
        port = gw.argv[gw.argv.index("--port") + 1]
        return f"http://{gw.host}:{port}"

    def metrics_urls(self, service: str) -> list[str]:
        urls = []
        for r in self.replicas[service]:
            flag = "--port" if service == "gateway" else "--metrics-port"
            urls.append(f"http://{r.host}:{r.argv[r.argv.index(flag) + 1]}/metrics")
        return urls


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")
