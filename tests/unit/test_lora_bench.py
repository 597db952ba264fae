"""bench/lora_throughput.py runs end to end on a tiny model: adapters written in PEFT's
layout load, both setups decode, and the report names each against the base."""

from bench import lora_throughput


def test_the_lora_benchmark_reports_adapters_against_the_base(capsys):
    lora_throughput.main(["--model", "random:tiny", "--streams", "4", "--adapters", "2",
                          "--prompt-tokens", "20", "--new-tokens", "6", "--rounds", "1",
                          "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "random:tiny" in lines[1] and "4 streams, rank 8" in lines[1]
    assert lines[2].strip().startswith("base model: decode") and "(1.00x" in lines[2]
    assert lines[3].strip().startswith("2 adapters: decode") and "x the base model)" in lines[3]
