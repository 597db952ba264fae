"""The one parser of the lines a pdserve server prints once it listens (and, for a worker
with --metrics-port, where its /metrics are)."""

import pytest

from pdserve.launch import listening_address, metrics_address, pdserve_argv


@pytest.mark.parametrize("line, address", [
    ("pdserve decode worker listening on 127.0.0.1:41234\n", "127.0.0.1:41234"),
    ("pdserve prefill worker listening on [::1]:50051", "[::1]:50051"),
    ("pdserve gateway listening on http://0.0.0.0:8000\n", "http://0.0.0.0:8000"),
    ("[decode-1] pdserve decode worker listening on 127.0.0.1:7\n", "127.0.0.1:7"),
    ("sink listening on 127.0.0.1:9\n", "127.0.0.1:9"),
    ("pdserve decode worker metrics on http://127.0.0.1:9100/metrics\n", None),
    ("INFO a log line that mentions listening on nothing in particular then more", None),
    ("", None),
])
def test_listening_address(line, address):
    assert listening_address(line) == address


@pytest.mark.parametrize("line, url", [
    ("pdserve decode worker metrics on http://127.0.0.1:9100/metrics\n",
     "http://127.0.0.1:9100/metrics"),
    ("[prefill-2] pdserve prefill worker metrics on http://[::1]:9101/metrics",
     "http://[::1]:9101/metrics"),
    ("pdserve decode worker listening on 127.0.0.1:41234\n", None),
    ("", None),
])
def test_metrics_address(line, url):
    assert metrics_address(line) == url


def test_pdserve_argv_runs_the_package_with_this_python():
    import sys

    assert pdserve_argv("up", "--port", "0") == [sys.executable, "-m", "pdserve", "up",
                                                 "--port", "0"]


def child_python(code: str) -> list[str]:
    import sys

    return [sys.executable, "-c", code]


def test_children_start_without_fork_handlers_in_their_own_group_on_their_cores(tmp_path):
    import os

    from pdserve.launch import ChildProcess

    marker = tmp_path / "forked"
    # Python runs these in a child only when it forks to run a preexec_fn; a vfork (what
    # gRPC's own fork handlers need us to use) runs none.
    os.register_at_fork(after_in_child=lambda: marker.touch())
    cores = sorted(os.sched_getaffinity(0))[:1]
    child = ChildProcess("probe", child_python(
        "import os; print(os.getpgid(0), sorted(os.sched_getaffinity(0)))"), cores=cores)
    assert child.proc.wait(10) == 0
    child._listening.wait(5)
    group, affinity = child.output().split(" ", 1)
    assert int(group) == child.proc.pid != os.getpgid(0)  # Ctrl-C here does not reach it
    assert affinity.strip() == str(cores)
    assert not marker.exists()


def test_a_child_started_to_die_with_its_parent_thread_does():
    import signal
    import threading

    from pdserve.launch import ChildProcess

    started: list[ChildProcess] = []
    ready = threading.Event()

    def parent_thread():
        started.append(ChildProcess("orphan", child_python(
            "import time; from pdserve.launch import die_with_parent; die_with_parent(); "
            "print('ready', flush=True); time.sleep(60)"), die_with_parent=True))
        while not started[0].lines:
            ready.wait(0.05)

    thread = threading.Thread(target=parent_thread)
    thread.start()
    thread.join(20)
    assert started[0].lines == ["ready\n"]
    assert started[0].proc.wait(10) == -signal.SIGTERM
    # Without the flag the same child lives on when its thread ends.
    plain = ChildProcess("plain", child_python(
        "import time; from pdserve.launch import die_with_parent; die_with_parent(); "
        "time.sleep(60)"))
    try:
        with pytest.raises(Exception, match="timed out"):
            plain.proc.wait(1)
    finally:
        plain.kill()
