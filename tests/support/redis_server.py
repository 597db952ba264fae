"""A real redis-server (Debian package redis-server, which `make test` installs) on a free
loopback port, with nothing saved to disk, for the tests of the Redis response store."""

import shutil
import subprocess
import tempfile
import time

import redis

from tests.support.stack import free_port


def redis_server_missing() -> str | None:
    """Why Redis tests cannot run here, or None when they can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian package redis-server; make test installs it)"
    return None


class RedisServer:
    """`with RedisServer() as server:` a running server at `server.url` (db 0)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--save", "", "--appendonly", "no", "--port", str(self.port),
             "--bind", "127.0.0.1", "--dir", self._dir.name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None:
                        output = self.process.stdout.read().decode()
                        raise RuntimeError(f"redis-server exited: {output}") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not answer PING within 10 s") \
                            from None
                    time.sleep(0.05)
        finally:
            client.close()

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
        self._dir.cleanup()
