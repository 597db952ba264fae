"""The `pdserve` flags are built from the config dataclasses: one default and one help
text per setting, the same in every command that has it, and the dtype rule that --help
states is the one the engine applies."""

import argparse
import dataclasses
import re

import pytest
import torch

import engine.cpu_features as cpu_features
import engine.model_runner as model_runner
from decode_worker.config import DecodeConfig
from engine.config import BF16_CPU_FLAGS, EngineConfig
from pdserve import stack
from pdserve.cli import build_parser, main
from pdserve.config_flags import changed_flags, config_from_args
from pdserve_config.security import SecurityConfig
from pdserve_config.tracing import TracingConfig
from prefill_worker.config import PrefillConfig
from server.gateway import GatewayConfig

# Which config classes each command's flags come from (and which fields it leaves out).
COMMANDS = {
    "prefill": [(PrefillConfig, ()), (EngineConfig, ()), (SecurityConfig, ()),
                (TracingConfig, ())],
    "decode": [(DecodeConfig, ()), (EngineConfig, ()), (SecurityConfig, ()),
               (TracingConfig, ())],
    "gateway": [(GatewayConfig, ()), (SecurityConfig, ()), (TracingConfig, ())],
    "up": [(stack.StackConfig, ()), (GatewayConfig, stack.GATEWAY_EXCLUDED),
           (EngineConfig, stack.ENGINE_EXCLUDED), (SecurityConfig, ()), (TracingConfig, ())],
    "generate": [(EngineConfig, ())],
    "health": [(SecurityConfig, ())],
}

# Flags of one request, not of a process: no config holds them.
HAND_WRITTEN = {"generate": {"prompt", "chat", "max_tokens", "temperature", "top_p", "top_k",
                             "sample_seed"},
                "health": {"timeout"}}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def actions(name: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in subparser(name)._actions if a.option_strings}


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_a_flag_with_the_fields_default_and_help(command):
    flags = actions(command)
    owned = {f.name for config, excluded in COMMANDS[command]
             for f in dataclasses.fields(config) if f.name not in excluded}
    assert set(flags) - {"help"} == owned | HAND_WRITTEN.get(command, set())
    for config, excluded in COMMANDS[command]:
        for field in dataclasses.fields(config):
            if field.name in excluded:
                continue
            action = flags[field.name]
            assert action.help and field.metadata["help"] in action.help
            if field.default is not dataclasses.MISSING:
                assert action.default == field.default, field.name
            else:
                assert action.required


def test_decode_help_states_the_dtype_rule_the_engine_applies(tmp_path, monkeypatch):
    text = one_line(subparser("decode").format_help())
    rule = re.search(r"auto: bfloat16 on CUDA and on CPUs with bf16 matrix instructions "
                     r"\(([a-z0-9_ ]+) in /proc/cpuinfo\), else float32", text)
    assert rule, text
    named = set(rule.group(1).split(" or "))
    assert named == set(BF16_CPU_FLAGS)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for flags in ["fpu sse avx2 avx512f avx512_fp16 amx_int8 amx_tile", *named]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse {flags}\n")
        expected = torch.bfloat16 if flags in named else torch.float32
        assert model_runner.resolve_dtype("auto", cpu) == expected, flags
    assert model_runner.resolve_dtype("auto", cuda) == torch.bfloat16
    assert model_runner.resolve_dtype("float32", cuda) == torch.float32


def test_boolean_fields_become_switches_and_env_variables(monkeypatch):
    args = build_parser().parse_args(["prefill", "--no-layerwise"])
    assert config_from_args(PrefillConfig, args).layerwise is False
    args = build_parser().parse_args(["gateway", "--decode", "a:1", "--prefill", "b:2",
                                      "--colocated"])
    config = config_from_args(GatewayConfig, args)
    assert config.colocated and config.prefill == () and config.decode == ("a:1",)
    monkeypatch.setenv("PDSERVE_LAYERWISE", "false")
    monkeypatch.setenv("PDSERVE_KV_CHUNK_BYTES", "4096")
    from pdserve.env_flags import apply_env_defaults
    parser = build_parser()
    apply_env_defaults(parser)
    config = config_from_args(PrefillConfig, parser.parse_args(["prefill"]))
    assert (config.layerwise, config.kv_chunk_bytes) == (False, 4096)


@pytest.mark.parametrize("argv, message", [
    (["prefill", "--transfer-timeout", "0"], "pdserve prefill: --transfer-timeout must be > 0"),
    (["decode", "--lease-timeout", "-1"], "pdserve decode: --lease-timeout must be > 0"),
    (["decode", "--port", "70000"], "pdserve decode: --port must be in [0, 65535]"),
    (["gateway", "--decode", "a:1", "--max-inflight", "0"],
     "pdserve gateway: --max-inflight must be >= 1"),
    (["decode", "--block-size", "12"], "block_size must be a power of two"),
])
def test_bad_values_end_the_command_naming_the_setting(argv, message, monkeypatch):
    monkeypatch.setattr("prefill_worker.server.run", lambda *a: pytest.fail("started"))
    monkeypatch.setattr("decode_worker.server.run", lambda *a: pytest.fail("started"))
    monkeypatch.setattr("server.gateway.run", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)


def test_up_passes_on_only_the_settings_that_differ_from_their_defaults():
    args = build_parser().parse_args([
        "up", "--dtype", "float32", "--kv-cache-tokens", "512", "--max-inflight", "8",
        "--api-key", "secret", "--model", "random:tiny", "--port", "9000"])
    worker = stack._worker_argv("decode", args, threads=1)
    assert worker[worker.index("decode"):] == [
        "decode", "--host", "127.0.0.1", "--port", "0", "--num-threads", "1",
        "--model", "random:tiny", "--dtype", "float32", "--kv-cache-tokens", "512"]
    gateway = stack._gateway_argv(args, {"decode": ["127.0.0.1:1"], "prefill": []})
    assert gateway[gateway.index("gateway"):] == [
        "gateway", "--host", "127.0.0.1", "--port", "9000", "--model", "random:tiny",
        "--decode", "127.0.0.1:1", "--max-inflight", "8"]
    assert "secret" not in " ".join(worker + gateway)  # the key goes by environment
    with_metrics = build_parser().parse_args(["up", "--worker-metrics"])
    assert stack._worker_argv("decode", with_metrics, threads=1)[-2:] == ["--metrics-port", "0"]


def test_up_passes_tls_by_flag_and_the_token_by_environment(tmp_path, monkeypatch):
    for name in ("ca", "cert", "key"):
        (tmp_path / f"{name}.pem").write_text("PEM")
    monkeypatch.delenv("PDSERVE_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    args = build_parser().parse_args([
        "up", "--internal-token", "t0ken", "--api-key", "k1,k2",
        "--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem"), "--tls-server-name", "pdserve-worker"])
    tls = ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem"),
           "--tls-key", str(tmp_path / "key.pem"), "--tls-server-name", "pdserve-worker"]
    worker = stack._worker_argv("prefill", args, threads=1)
    gateway = stack._gateway_argv(args, {"decode": ["127.0.0.1:1"], "prefill": []})
    for argv in (worker, gateway):
        assert argv[-len(tls):] == tls
        assert "t0ken" not in " ".join(argv) and "k1" not in " ".join(argv)
    assert stack._child_env(args, "prefill")["PDSERVE_INTERNAL_TOKEN"] == "t0ken"
    assert "PDSERVE_API_KEY" not in stack._child_env(args, "decode")  # the gateway's only
    gateway_env = stack._child_env(args, "gateway")
    assert (gateway_env["PDSERVE_INTERNAL_TOKEN"], gateway_env["PDSERVE_API_KEY"]) == \
        ("t0ken", "k1,k2")


def test_security_settings_are_checked_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr("prefill_worker.server.run", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit, match="missing --tls-cert, --tls-key"):
        main(["prefill", "--tls-ca", str(tmp_path)])
    monkeypatch.setenv("PDSERVE_TLS_CA", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("PDSERVE_TLS_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("PDSERVE_TLS_KEY", str(tmp_path / "key.pem"))
    with pytest.raises(SystemExit, match="--tls-ca .*ca.pem: no such file"):
        main(["prefill"])


def test_changed_flags_round_trip_through_the_parser():
    argv = ["gateway", "--decode", "a:1,b:2", "--prefill", "c:3", "--colocated",
            "--request-timeout", "5.5", "--served-model-name", "m"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(["gateway", *changed_flags(GatewayConfig, args)])
    assert config_from_args(GatewayConfig, again) == config_from_args(GatewayConfig, args)


def test_documented_flag_tables_are_the_configs():
    from pdserve import flag_docs

    text = flag_docs.DOC.read_text()
    assert flag_docs.replace_in(text) == text, \
        "docs/configuration.md's flag tables drift from the configs: " \
        "python -m pdserve.flag_docs --write"


def test_up_gives_the_priority_aging_to_the_gateway_and_the_workers_alike():
    args = build_parser().parse_args(["up", "--priority-aging-seconds", "2.5"])
    worker = stack._worker_argv("prefill", args, threads=1)
    gateway = stack._gateway_argv(args, {"decode": ["127.0.0.1:1"], "prefill": []})
    for argv in (worker, gateway):
        assert argv[argv.index("--priority-aging-seconds") + 1] == "2.5"


def test_up_passes_the_tracing_settings_to_every_process():
    args = build_parser().parse_args(["up", "--otlp-endpoint", "http://127.0.0.1:4317",
                                      "--trace-sample-ratio", "0.5"])
    worker = stack._worker_argv("decode", args, threads=1)
    gateway = stack._gateway_argv(args, {"decode": ["127.0.0.1:1"], "prefill": []})
    for argv in (worker, gateway):
        assert argv[argv.index("--otlp-endpoint") + 1] == "http://127.0.0.1:4317"
        assert argv[argv.index("--trace-sample-ratio") + 1] == "0.5"


def test_up_passes_the_lora_adapters_to_every_worker_and_not_to_the_gateway():
    args = build_parser().parse_args(["up", "--lora", "sql=/a/sql", "--lora", "chat=/b/chat",
                                      "--max-loras", "2"])
    gateway = stack._gateway_argv(args, {"decode": ["127.0.0.1:1"], "prefill": []})
    assert "--lora" not in gateway and "--max-loras" not in gateway
    for role in ("prefill", "decode"):
        worker = stack._worker_argv(role, args, threads=1)
        again = build_parser().parse_args(worker[worker.index(role):])
        engine = config_from_args(EngineConfig, again)
        assert (engine.lora, engine.max_loras) == (("sql=/a/sql", "chat=/b/chat"), 2)
