"""`pdserve up`'s supervisor with real child processes: a worker that exits is started
again on its port after a backoff that doubles while it keeps failing, and so is the
gateway."""

import re
import sys
import threading
import time

from pdserve.launch import ChildProcess
from pdserve.supervisor import Supervisor

LISTEN = "print('w listening on 127.0.0.1:4567', flush=True)"


def child(name: str, code: str) -> ChildProcess:
    process = ChildProcess(name, [sys.executable, "-c", code])
    if "listening" in code:
        process.wait_listening(30)
    return process


def test_a_failing_worker_is_restarted_on_its_port_with_growing_delays(capsys):
    starts: list[tuple[float, int]] = []

    def restart(port: int) -> ChildProcess:
        starts.append((time.monotonic(), port))
        # Fails twice more, then stays up.
        return child("decode-1", LISTEN + ("; import time; time.sleep(60)"
                                           if len(starts) >= 3 else "; raise SystemExit(3)"))

    gateway = child("gateway", "import time; time.sleep(60)")
    children = [child("decode-1", LISTEN + "; raise SystemExit(1)"), gateway]
    supervisor = Supervisor(children, {"decode-1": restart}, first_delay=0.2, max_delay=5)
    stop = threading.Event()
    began = time.monotonic()
    runner = threading.Thread(target=lambda: supervisor.run(stop, interval=0.05))
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while len(starts) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert [port for _, port in starts] == [4567] * 3
        # Each gap also holds a child's start-up, which varies on a busy machine, so the
        # backoff is checked as a lower bound on every gap and in the announced delays.
        gaps = [b - a for (a, _), (b, _) in zip([(began, 0), *starts], starts, strict=False)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8
        assert children[0].alive and supervisor.watches["decode-1"].restarts == 3
    finally:
        stop.set()
        runner.join(10)
        for c in children:
            c.stop(1)
    err = capsys.readouterr().err
    assert "decode-1 exited with code 1; restarting it on port 4567 in 0.2 s" in err
    assert [float(d) for d in re.findall(r"restarting it on port 4567 in ([0-9.]+) s", err)] \
        == [0.2, 0.4, 0.8]
    assert "decode-1 restarted (restart 3)" in err


def test_the_gateway_is_restarted_on_its_port_like_a_worker(capsys):
    ports: list[int] = []
    gateway_line = "print('gateway listening on http://127.0.0.1:4568', flush=True)"

    def restart(port: int) -> ChildProcess:
        ports.append(port)
        return child("gateway", gateway_line + "; import time; time.sleep(60)")

    children = [child("gateway", gateway_line + "; raise SystemExit(2)")]
    supervisor = Supervisor(children, {"gateway": restart}, first_delay=0.1)
    stop = threading.Event()
    runner = threading.Thread(target=lambda: supervisor.run(stop, interval=0.05))
    runner.start()
    try:
        deadline = time.monotonic() + 20
        # `ports` fills as the restart begins; the list holds the new child only after.
        while not (ports and children[0].alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ports == [4568] and children[0].alive
    finally:
        stop.set()
        runner.join(10)
        for c in children:
            c.stop(1)
    assert "gateway exited with code 2; restarting it on port 4568" in capsys.readouterr().err
