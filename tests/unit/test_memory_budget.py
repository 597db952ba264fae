"""The CPU KV cache is sized from the container's memory limit when there is one."""

import os

from engine.model_runner import usable_ram_bytes
from tests.unit.conftest import tiny_engine

PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_cgroup_v2_limit_below_the_ram_wins(tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{PHYSICAL // 4}\n")
    assert usable_ram_bytes((str(limit),)) == PHYSICAL // 4


def test_no_limit_means_the_physical_ram(tmp_path):
    v2 = tmp_path / "memory.max"
    v2.write_text("max\n")
    assert usable_ram_bytes((str(v2),)) == PHYSICAL
    v1 = tmp_path / "memory.limit_in_bytes"
    v1.write_text("9223372036854771712\n")
    assert usable_ram_bytes((str(v1),)) == PHYSICAL
    assert usable_ram_bytes((str(tmp_path / "absent"),)) == PHYSICAL


def test_v1_is_read_when_there_is_no_v2_file(tmp_path):
    v1 = tmp_path / "memory.limit_in_bytes"
    v1.write_text(f"{2 << 30}\n")
    expected = min(PHYSICAL, 2 << 30)
    assert usable_ram_bytes((str(tmp_path / "memory.max"), str(v1))) == expected


def test_the_cpu_kv_cache_takes_its_share_of_the_limit(monkeypatch):
    import torch

    import engine.model_runner as model_runner
    from engine.kv_cache import bytes_per_block

    monkeypatch.setattr(model_runner, "usable_ram_bytes", lambda: 64 << 20)
    engine = tiny_engine(kv_cache_tokens=None, block_size=16, kv_cache_memory_fraction=0.5)
    per_block = bytes_per_block(engine.model_config, 16, torch.float32)
    assert engine.runner.num_blocks == (32 << 20) // per_block
