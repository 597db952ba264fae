"""Worker pool picking and address handling, without any worker (pure logic)."""

import time

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


def test_a_burst_placed_before_any_first_answer_is_spread():
    # Placed one after another, each waiting for its decode worker's first answer
    # before it counts in flight: without the placing count all would go to a.
    p = pool("decode", a=dict(free_kv_blocks=100), b=dict(free_kv_blocks=90))
    with p.placing(p.pick()) as first:
        assert first.address == "a" and first.sequences() == 1
        with p.placing(p.pick()) as second:
            assert second.address == "b"
            assert p.pick().address == "a"  # one each: the most free blocks again
    assert p.workers["a"].sequences() == p.workers["b"].sequences() == 0


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


def with_prefix(worker: Worker, prompt: list[int], blocks: int, space=b"ns") -> Worker:
    """The worker reports holding the first `blocks` full blocks of `prompt`."""
    from pdserve_proto.prefix import block_hashes, short

    worker.health.prefix_namespace = space
    names = block_hashes(prompt, 16, space)[:blocks]
    worker.prefix_blocks = frozenset(short(n) for n in names)
    return worker


def test_decode_pick_weighs_the_cached_prefix_against_the_batch():
    from server.placement import LOAD_TOKENS_PER_SEQUENCE
    from server.prefix_index import PromptBlocks

    prompt = list(range(100, 230))  # 130 tokens: 8 full blocks before the last token
    p = pool("decode", a=dict(free_kv_blocks=50, running=2), b=dict(free_kv_blocks=90))
    assert p.pick().address == "b"  # no prefix known: the lighter batch, more room
    with_prefix(p.workers["a"], prompt, 8)
    blocks = PromptBlocks(prompt)
    assert blocks.matched_tokens(p.workers["a"]) == 128
    assert blocks.matched_tokens(p.workers["b"]) == 0
    assert p.pick(prompt=blocks).address == "a"  # 128 - 2 x 32 > 0
    p.workers["a"].health.running = 128 // LOAD_TOKENS_PER_SEQUENCE + 1
    assert p.pick(prompt=blocks).address == "b"  # too busy for what it holds


def test_prefill_pick_counts_only_the_tokens_it_would_compute():
    from server.prefix_index import PromptBlocks

    prompt = list(range(7, 300))
    p = pool("prefill", a=dict(queued_prompt_tokens=200), b=dict(queued_prompt_tokens=0))
    blocks = PromptBlocks(prompt)
    assert p.pick(prompt=blocks).address == "b"
    with_prefix(p.workers["a"], prompt, 16)  # 256 of its 293 tokens cached on a
    assert p.pick(prompt=blocks).address == "a"  # 200 + 37 to compute against 293


def test_a_prefix_match_stops_at_the_first_missing_block_and_needs_the_namespace():
    from server.prefix_index import PromptBlocks

    prompt = list(range(1, 100))
    p = pool("decode", a=dict(free_kv_blocks=10))
    worker = with_prefix(p.workers["a"], prompt, 6)
    names = sorted(worker.prefix_blocks)
    assert PromptBlocks(prompt).matched_tokens(worker) == 96
    from pdserve_proto.prefix import block_hashes, short
    second = short(block_hashes(prompt, 16, b"ns")[1])
    worker.prefix_blocks = frozenset(set(names) - {second})
    assert PromptBlocks(prompt).matched_tokens(worker) == 16
    worker.health.prefix_namespace = b"other-model"
    assert PromptBlocks(prompt).matched_tokens(worker) == 0


def test_reports_replace_the_names_only_when_they_carry_them():
    w = Worker("a", "decode", None, None)
    w.take_report(common_pb2.HealthResponse(prefix_namespace=b"ns", prefix_version=3,
                                            prefix_blocks_sent=True, prefix_blocks=[1, 2]))
    assert w.prefix_blocks == {1, 2} and w.prefix_version == 3
    w.take_report(common_pb2.HealthResponse(prefix_namespace=b"ns", prefix_version=3))
    assert w.prefix_blocks == {1, 2}  # unchanged since version 3: not resent
    w.take_report(common_pb2.HealthResponse(prefix_namespace=b"ns", prefix_version=4,
                                            prefix_blocks_sent=True))
    assert w.prefix_blocks == frozenset()  # sent, and empty: everything was evicted


def test_a_lora_request_goes_only_to_workers_holding_the_adapter_named_in_its_namespace():
    from pdserve_proto.prefix import adapter_namespace, block_hashes, short
    from server.prefix_index import PromptBlocks

    prompt = list(range(1, 100))
    p = pool("decode", a=dict(free_kv_blocks=90), b=dict(free_kv_blocks=10),
             c=dict(free_kv_blocks=50))
    for name in "abc":
        p.workers[name].take_report(common_pb2.HealthResponse(
            free_kv_blocks=p.workers[name].health.free_kv_blocks, block_size=16,
            prefix_namespace=b"ns", loras=[common_pb2.LoraAdapter(name="sql", digest="d1")]
            if name != "a" else []))
    assert p.pick().address == "a"  # the base model: every worker
    sql = PromptBlocks(prompt, "sql")
    assert p.pick(prompt=sql).address == "c"  # a lacks it: of b and c, the most room
    # b holds 5 blocks of the prompt under the adapter: named in the adapter's namespace,
    # not the base model's, whose names on c match nothing of the adapter's prompt.
    b, c = p.workers["b"], p.workers["c"]
    b.prefix_blocks = frozenset(short(n) for n in block_hashes(
        prompt, 16, adapter_namespace(b"ns", "d1"))[:5])
    c.prefix_blocks = frozenset(short(n) for n in block_hashes(prompt, 16, b"ns"))
    assert (sql.matched_tokens(b), sql.matched_tokens(c)) == (80, 0)
    assert PromptBlocks(prompt).matched_tokens(c) == 96
    assert p.pick(prompt=sql).address == "b"
    with pytest.raises(NoWorkerError, match="no healthy decode worker with LoRA adapter "
                                            "'poet'"):
        p.pick(prompt=PromptBlocks(prompt, "poet"))


def test_a_report_asked_before_the_gateway_changed_the_adapters_leaves_them_alone():
    w = Worker("a", "decode", None, None)
    asked = time.monotonic()
    w.set_lora("poet", "d2")  # loaded through the admin endpoint after the poll was sent
    w.take_report(common_pb2.HealthResponse(), asked_at=asked)
    assert w.loras == {"poet": "d2"}
    w.set_lora("poet", None)
    w.take_report(common_pb2.HealthResponse(loras=[common_pb2.LoraAdapter(
        name="poet", digest="d2")]), asked_at=asked)
    assert w.loras == {}  # the unload stands against an older report
    w.take_report(common_pb2.HealthResponse(loras=[common_pb2.LoraAdapter(
        name="sql", digest="d1")]), asked_at=time.monotonic())
    assert w.loras == {"sql": "d1"}
