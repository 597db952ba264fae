"""The one parser of the line a pdserve server prints once it listens."""

import pytest

from pdserve.launch import listening_address, pdserve_argv


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


def test_pdserve_argv_runs_the_package_with_this_python():
    import sys

    assert pdserve_argv("up", "--port", "0") == [sys.executable, "-m", "pdserve", "up",
                                                 "--port", "0"]
