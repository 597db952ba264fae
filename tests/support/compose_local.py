"""Run deploy/docker-compose.yml's pdserve services as local processes.

There is no Docker engine here, so each replica runs as a process with the service's
own command (after the image's ENTRYPOINT, read from deploy/Dockerfile) and environment.
Every replica gets its own loopback address (127.a.b.c), so replicas keep the ports the
compose file gives them, and a service name in an argument (`decode:50052`) becomes the
list of its replicas' addresses, as compose's DNS would answer it, and so does one in
a URL of an environment variable (`redis://redis:6379/0`). Services of other images
(`redis`) run their command from PATH. Each named volume is a temporary folder, which
takes the place of its mount point in the commands and variables of the services that
mount it. `variables` stand for the operator's environment that `${VAR:-default}`
reads.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
START_TIMEOUT = 180
# Offsets of each service's replicas in the run's 127.a.b.0/24.
_HOST_BASE = {"gateway": 10, "prefill": 20, "decode": 30, "prometheus": 40, "redis": 50}
# Started before the workers and the gateway, as compose would for a service they need.
_BACKING = ("redis",)


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


def program(name: str) -> str:
    """This environment's console script of that name, else the one on PATH."""
    own = Path(sys.executable).parent / name
    return str(own) if own.exists() else (shutil.which(name) or name)


class LocalCompose:
    def __init__(self, replicas: dict[str, int], variables: dict[str, str] | None = None):
        self.compose = load_compose()
        self.variables = dict(variables or {})
        self.net = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        self.volumes_dir = Path(tempfile.mkdtemp(prefix="compose-volumes-"))
        self.replicas: dict[str, list[Replica]] = {}
        for service, count in replicas.items():
            self.replicas[service] = [self._replica(service, i, count)
                                      for i in range(count)]
        # Built after every host is known: a service name stands for all its replicas.
        for reps in self.replicas.values():
            for r in reps:
                r.argv = [self._map_names(a) for a in r.argv]
                r.env = {k: self._map_url_names(v) if k in self._declared(r.service) else v
                         for k, v in r.env.items()}

    def _declared(self, service: str) -> set[str]:
        return set(self.compose["services"][service].get("environment", {}))

    def _volume_mounts(self, service: str) -> dict[str, str]:
        """Mount point -> local folder, for each named volume the service mounts."""
        named = set(self.compose.get("volumes") or {})
        mounts = {}
        for entry in self.compose["services"][service].get("volumes", []):
            source, target = entry.split(":")[:2]
            if source in named:
                folder = self.volumes_dir / source
                folder.mkdir(exist_ok=True)
                mounts[target] = str(folder)
        return mounts

    def host(self, service: str, index: int) -> str:
        return f"{self.net}.{_HOST_BASE[service] + index + 1}"

    def _replica(self, service: str, index: int, count: int) -> Replica:
        spec = self.compose["services"][service]
        host = self.host(service, index)
        mounts = self._volume_mounts(service)

        def local(value: str) -> str:
            for target, folder in mounts.items():
                value = re.sub(re.escape(target) + r"(?=/|$)", folder, value)
            return value

        if "build" in spec:  # pdserve's image: its ENTRYPOINT, then the command
            entry = image_entrypoint()
            # The image's `pdserve` is this environment's console script.
            command = [program(entry[0]), *entry[1:], *spec["command"]]
        else:  # another image: its command, found on PATH
            command = [program(spec["command"][0]), *spec["command"][1:]]
        argv = [host if a == "0.0.0.0" else local(a) for a in command]
        # Only the compose file's PDSERVE_ settings apply; PDSERVE_CACHE (set by the
        # image to its converted model) stays this machine's own.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PDSERVE_") or k == "PDSERVE_CACHE"}
        for key, value in spec.get("environment", {}).items():
            env[key] = local(interpolate(str(value), self.variables).replace("127.0.0.1", host))
        check = spec["healthcheck"]["test"]
        assert check[0] == "CMD", check
        # 127.0.0.1 is the container itself: here the replica's own address.
        healthcheck = [program(check[1]), *(a.replace("127.0.0.1", host) for a in check[2:])]
        return Replica(service, index, host, argv, env, healthcheck)

    def _map_names(self, arg: str) -> str:
        m = re.fullmatch(r"(\w+):(\d+)", arg)
        if not m or m.group(1) not in self.replicas:
            return arg
        return ",".join(f"{r.host}:{m.group(2)}" for r in self.replicas[m.group(1)])

    def _map_url_names(self, value: str) -> str:
        """`scheme://service:port...` -> the service's first replica's address."""
        def sub(m):
            if m.group(1) not in self.replicas:
                return m.group(0)
            return f"//{self.replicas[m.group(1)][0].host}:{m.group(2)}"
        return re.sub(r"//(\w+):(\d+)", sub, value)

    def up(self) -> None:
        """Start in depends_on order: Redis and every worker healthy before the gateway
        starts."""
        first = [r for s in (*_BACKING, "prefill", "decode") for r in self.replicas.get(s, [])]
        for r in first:
            r.start()
        for r in first:
            r.wait_healthy()
        for r in self.replicas.get("gateway", []):
            r.start()
            r.wait_healthy()

    def down(self) -> None:
        for reps in self.replicas.values():
            for r in reps:
                r.stop()
        shutil.rmtree(self.volumes_dir, ignore_errors=True)

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
