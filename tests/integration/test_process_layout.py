"""What the import contracts cannot see: the gateway's modules and `pdserve --help` load
no torch at run time (in a fresh interpreter), and pdserve.launch's child processes."""

import subprocess
import sys

import pytest

from pdserve.launch import ChildProcess


@pytest.mark.parametrize("modules", [
    "server.app, server.tokenizer, server.detokenizer, server.openai_api",
    "pdserve.cli",
])
def test_light_modules_load_without_torch_or_transformers(modules):
    code = (f"import sys, {modules}\n"
            "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pdserve_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "pdserve", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for command in ("prefill", "decode", "gateway", "up", "generate", "health", "bench"):
        assert command in done.stdout


def test_child_process_reports_its_address_and_its_output():
    child = ChildProcess("echo", [sys.executable, "-c",
                                  "print('warming up'); print('x listening on 127.0.0.1:5', "
                                  "flush=True); import time; time.sleep(30)"])
    try:
        assert child.wait_listening(30) == "127.0.0.1:5" and child.alive
    finally:
        assert child.stop() != 0  # SIGTERM
    assert child.output().startswith("warming up\n")


def test_child_process_that_dies_says_how_and_what_it_printed():
    child = ChildProcess("broken", [sys.executable, "-c",
                                    "import sys; print('bad flag'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"broken did not start \(exit code 3\):\nbad flag"):
        child.wait_listening(30)
