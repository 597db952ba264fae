"""Graceful drain, each side on its own: the worker's Drain (refuses new work once
draining, waits for what runs), and the gateway's reading of it (a draining worker
leaves the rotation but keeps its streams; a worker gone is out at once; a worker no
longer behind its name stays until its requests end)."""

import asyncio

import grpc
import pytest

from pdserve_proto.draining import DRAINING_METADATA, is_draining
from pdserve_proto.v1 import common_pb2
from server.pool import Worker, WorkerPool
from server.worker_calls import WorkerCalls
from worker.drain import Drain, DrainingError


def test_drain_refuses_new_work_once_begun_and_counts_what_runs():
    drain = Drain("decode")
    with drain.admit():
        assert drain.active == 1
        drain.begin()
        with pytest.raises(DrainingError) as refused, drain.admit():
            pass
    assert drain.active == 0
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "decode worker is draining" in refused.value.message


def test_drain_waits_for_the_work_in_flight_up_to_its_timeout():
    async def scenario():
        drain = Drain("prefill")
        release = asyncio.Event()

        async def request():
            with drain.admit():
                await release.wait()

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        drain.begin()
        assert await drain.wait(0.05) is False  # still running at the deadline
        release.set()
        assert await drain.wait(5) is True
        await task
        assert await Drain("idle").wait(0) is True

    asyncio.run(scenario())


def test_the_refusal_carries_the_draining_metadata():
    class Context:
        async def abort(self, code, details, trailing_metadata=()):
            self.args = code, details, trailing_metadata

    context = Context()
    asyncio.run(DrainingError("decode").abort(context))
    assert context.args[0] == grpc.StatusCode.UNAVAILABLE
    assert is_draining(context.args[2]) and not is_draining(()) and not is_draining(None)


def make_pool() -> tuple[WorkerPool, Worker, Worker]:
    pool = WorkerPool("decode", ["127.0.0.1:1", "127.0.0.1:2"], poll_interval=1,
                      resolve_interval=1)
    a, b = (Worker(address, "decode", channel=None, stub=None, healthy=True)
            for address in ("127.0.0.1:1", "127.0.0.1:2"))
    pool.workers = {a.address: a, b.address: b}
    return pool, a, b


def test_a_worker_that_reports_draining_leaves_the_rotation_but_stays_healthy():
    pool, a, b = make_pool()
    a.take_report(common_pb2.HealthResponse(draining=True, instance_id="x"))
    assert pool.healthy() == [b] and a.healthy  # its streams are not taken for stalled
    a.take_report(common_pb2.HealthResponse(instance_id="y"))  # the new process
    assert pool.healthy() == [a, b]


def rpc_error(code, trailing=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing),
                                details="refused")


def test_a_draining_refusal_marks_the_worker_draining_and_a_plain_one_down():
    pool, a, b = make_pool()
    WorkerCalls._failed(pool, a, rpc_error(grpc.StatusCode.UNAVAILABLE, DRAINING_METADATA))
    assert (a.draining, a.healthy) == (True, True)
    WorkerCalls._failed(pool, b, rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert (b.draining, b.healthy) == (False, False)
    assert pool.healthy() == []


def test_a_worker_gone_from_its_name_is_kept_until_its_requests_end():
    async def scenario():
        pool, a, b = make_pool()

        class Channel:
            closed = False

            async def close(self):
                self.closed = True

        a.channel, b.channel = Channel(), Channel()
        a.inflight = 1
        await pool._unlist(a)
        await pool._unlist(b)
        assert set(pool.workers) == {a.address} and not a.listed and b.channel.closed
        assert pool.healthy() == []
        a.inflight = 0
        await pool._unlist(a)
        assert pool.workers == {} and a.channel.closed

    asyncio.run(scenario())


class FailingPrefill:
    def __init__(self, code):
        self.code = code

    async def Prefill(self, request, **kwargs):
        raise rpc_error(self.code)


def prefill_call(pool: WorkerPool, failed: set[str]):
    from pdserve_proto.v1 import decode_pb2
    from server.prefix_index import PromptBlocks

    calls = WorkerCalls(decode=None, prefill=pool, request_timeout=10)
    decode = Worker("127.0.0.1:9", "decode", channel=None, stub=None, healthy=True)
    return asyncio.run(calls.prefill_call("r", [1, 2, 3], None, decode,
                                          decode_pb2.Reserved(lease_id="l"), failed,
                                          PromptBlocks([1, 2, 3])))


def prefill_pool(code) -> tuple[WorkerPool, Worker]:
    pool = WorkerPool("prefill", ["127.0.0.1:3"], poll_interval=1, resolve_interval=1)
    worker = Worker("127.0.0.1:3", "prefill", channel=None, stub=FailingPrefill(code),
                    healthy=True)
    pool.workers = {worker.address: worker}
    return pool, worker


def test_a_decode_worker_gone_under_a_prefill_is_retried_without_blaming_the_prefill():
    from server.worker_calls import RetryPrefill

    pool, worker = prefill_pool(grpc.StatusCode.ABORTED)
    failed: set[str] = set()
    with pytest.raises(RetryPrefill):
        prefill_call(pool, failed)
    assert failed == set() and pool.healthy() == [worker]
    pool, worker = prefill_pool(grpc.StatusCode.UNAVAILABLE)  # the prefill worker itself
    with pytest.raises(RetryPrefill):
        prefill_call(pool, failed)
    assert failed == {worker.address} and pool.healthy() == []
    # No prefill worker left by then: a retry too (it prefills on the decode worker).
    with pytest.raises(RetryPrefill) as retry:
        prefill_call(pool, set())
    assert retry.value.error.status == 503
