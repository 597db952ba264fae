"""Worker pool picking and address handling, without any worker (pure logic)."""

import pytest

from pdserve.stack import core_shares
from pdserve_proto.v1 import common_pb2
from server.pool import NoWorkerError, Worker, WorkerPool, resolve, split_address


def pool(role: str, **reports) -> WorkerPool:
    p = WorkerPool(role, [], poll_interval=1.0, resolve_interval=10.0)
    for address, fields in reports.items():
        w = Worker(address, role, None, None, healthy=fields.pop("healthy", True))
        w.health = common_pb2.HealthResponse(block_size=16, **fields)
        p.workers[address] = w
    return p


def test_decode_pick_most_free_blocks_counting_what_was_just_sent():
    p = pool("decode", a=dict(free_kv_blocks=100), b=dict(free_kv_blocks=90))
    a = p.pick()
    assert a.address == "a"
    with p.count_inflight(a, prompt_tokens=320):  # 20 blocks not in a's last report yet
        assert a.free_blocks() == 80
        assert p.pick().address == "b"
    assert a.free_blocks() == 100


def test_a_report_replaces_the_pending_estimate():
    p = pool("decode", a=dict(free_kv_blocks=100))
    a = p.workers["a"]
    with p.count_inflight(a, prompt_tokens=32):
        a.pending_blocks = 0  # what _poll does on a fresh report...
        a.epoch += 1
    assert a.pending_blocks == 0  # ...and the count's end must not subtract again


def test_prefill_pick_fewest_queued_tokens_and_skips_unhealthy():
    p = pool("prefill", a=dict(queued_prompt_tokens=500), b=dict(queued_prompt_tokens=700),
             c=dict(queued_prompt_tokens=0, healthy=False))
    assert p.pick().address == "a"
    with p.count_inflight(p.workers["a"], prompt_tokens=300):
        assert p.pick().address == "b"
    assert p.pick(exclude={"a"}).address == "b"


def test_no_healthy_worker_says_which_and_why():
    p = pool("prefill", a=dict(healthy=False))
    p.workers["a"].last_error = "UNAVAILABLE: connection refused"
    with pytest.raises(NoWorkerError, match="a \\(UNAVAILABLE: connection refused\\)"):
        p.pick()


def test_failed_polls_take_a_worker_out_after_fail_after_but_calls_at_once():
    p = pool("decode", a=dict(free_kv_blocks=1))
    a = p.workers["a"]
    p.report_failure(a, "x", poll=True)
    assert a.healthy
    p.report_failure(a, "x", poll=True)
    assert not a.healthy
    b = pool("decode", b=dict(free_kv_blocks=1)).workers["b"]
    p.workers["b"] = b
    p.report_failure(b, "stream broke")
    assert not b.healthy


def test_addresses():
    assert split_address("decode:50052") == ("decode", 50052)
    assert split_address("[::1]:7") == ("::1", 7)
    for bad in ("decode", "decode:", ":80", "host:port"):
        with pytest.raises(ValueError, match="not host:port"):
            split_address(bad)
    assert resolve("127.0.0.1:9") == ["127.0.0.1:9"]
    assert resolve("localhost:9") == ["localhost:9"]


def test_core_shares():
    assert core_shares([0, 1], 2) == [[0], [1]]
    assert core_shares([0, 1, 2, 3, 4], 2) == [[0, 1, 4], [2, 3]]
    assert core_shares([0, 1], 3) == [[0], [1], [0]]
