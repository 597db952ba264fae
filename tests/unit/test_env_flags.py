"""PDSERVE_<FLAG> environment variables as flag defaults."""

import argparse

import pytest

from pdserve.env_flags import apply_env_defaults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    sub = p.add_subparsers(dest="command", required=True)
    gw = sub.add_parser("gateway")
    gw.add_argument("--decode", required=True)
    gw.add_argument("--max-inflight", type=int, default=64)
    gw.add_argument("--colocated", action="store_true")
    gw.add_argument("--no-pin", dest="pin", action="store_false")
    gw.add_argument("--dtype", default="auto", choices=["auto", "float32"])
    return p


def parse(argv, env):
    p = parser()
    apply_env_defaults(p, env)
    return p.parse_args(argv)


def test_env_fills_defaults_and_required_flags():
    env = {"PDSERVE_DECODE": "decode:50052", "PDSERVE_MAX_INFLIGHT": "8",
           "PDSERVE_COLOCATED": "true", "PDSERVE_PIN": "false", "PDSERVE_DTYPE": "float32"}
    args = parse(["gateway"], env)
    assert (args.decode, args.max_inflight, args.colocated, args.pin, args.dtype) == \
        ("decode:50052", 8, True, False, "float32")


def test_command_line_wins_over_env():
    args = parse(["gateway", "--decode", "a:1", "--max-inflight", "3"],
                 {"PDSERVE_DECODE": "b:2", "PDSERVE_MAX_INFLIGHT": "8"})
    assert (args.decode, args.max_inflight) == ("a:1", 3)


def test_without_env_nothing_changes():
    args = parse(["gateway", "--decode", "a:1"], {})
    assert (args.max_inflight, args.colocated, args.pin, args.dtype) == (64, False, True, "auto")
    with pytest.raises(SystemExit):
        parse(["gateway"], {})


@pytest.mark.parametrize("env, message", [
    ({"PDSERVE_MAX_INFLIGHT": "lots"}, "PDSERVE_MAX_INFLIGHT='lots'"),
    ({"PDSERVE_COLOCATED": "maybe"}, "PDSERVE_COLOCATED='maybe': expected true or false"),
    ({"PDSERVE_DTYPE": "int4"}, "PDSERVE_DTYPE='int4': choose from auto, float32"),
])
def test_bad_env_values_fail_naming_the_variable(env, message, capsys):
    with pytest.raises(SystemExit):
        parse(["gateway", "--decode", "a:1"], env)
    assert message in capsys.readouterr().err
