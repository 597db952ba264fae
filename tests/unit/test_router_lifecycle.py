"""A request's life across the pools, driven through server.router.Router against fake
worker stubs (no processes): a prefill retry on each retryable status, a migration at
every point of a decode stream, the migration limit, a request that finished before its
worker failed, and a worker that stalls."""

import asyncio

import grpc
import pytest

from pdserve_proto.v1 import common_pb2, decode_pb2, prefill_pb2
from server import worker_calls
from server.errors import APIError
from server.events import FinishEvent, PrefillEvent, TokenEvent
from server.pool import Worker, WorkerPool
from server.router import Router

PROMPT = list(range(10, 50))
TOKENS = [101, 102, 103, 104, 105]
PARAMS = common_pb2.SamplingParams(max_tokens=len(TOKENS), stop_token_ids=[2], seed=7)
HANG = object()  # a stream that sends nothing more


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=f"fake {code.name}")


def token(index: int, token_id: int) -> decode_pb2.GenerateResponse:
    return decode_pb2.GenerateResponse(token=common_pb2.Token(token_id=token_id, index=index))


def finished(count: int) -> decode_pb2.GenerateResponse:
    return decode_pb2.GenerateResponse(finished=decode_pb2.Finished(
        finish_reason=decode_pb2.FINISH_REASON_LENGTH, prompt_tokens=len(PROMPT),
        completion_tokens=count))


class FakeCall:
    """A Generate stream: its messages in order; an AioRpcError item is raised, HANG
    waits for ever."""

    def __init__(self, items):
        self.items = list(items)
        self.cancelled = False

    async def read(self):
        if not self.items:
            return grpc.aio.EOF
        item = self.items.pop(0)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        if item is HANG:
            await asyncio.Event().wait()
        return item

    def cancel(self):
        self.cancelled = True


class FakeDecode:
    """A decode worker's stub: each Generate call takes the next script, a function of
    the request that returns the stream's items."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.requests: list[decode_pb2.GenerateRequest] = []
        self.calls: list[FakeCall] = []

    def Generate(self, request, metadata=(), timeout=None):  # noqa: N802 - gRPC's name
        self.requests.append(request)
        call = FakeCall(self.scripts.pop(0)(request))
        self.calls.append(call)
        return call


class FakePrefill:
    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.requests: list[prefill_pb2.PrefillRequest] = []

    async def Prefill(self, request, metadata=(), timeout=None):  # noqa: N802
        self.requests.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, grpc.aio.AioRpcError):
            raise outcome
        return prefill_pb2.PrefillResponse(first_token=common_pb2.Token(token_id=outcome))


def pool(role: str, **stubs) -> WorkerPool:
    p = WorkerPool(role, [], poll_interval=1.0, resolve_interval=10.0)
    for address, stub in stubs.items():
        worker = Worker(address, role, None, stub, healthy=True)
        worker.health = common_pb2.HealthResponse(block_size=16, free_kv_blocks=100,
                                                  max_seq_len=4096)
        p.workers[address] = worker
    return p


def colocated_run(tokens, *, start=0, then=None):
    """A colocated stream of `tokens` (output indexes from `start`), then `then` (an error,
    HANG) or, by default, the finish."""
    def script(request):
        items = [token(start + i, t) for i, t in enumerate(tokens)]
        return items + ([then] if then is not None else [finished(start + len(tokens))])
    return script


def collect(router: Router, params=PARAMS):
    async def run():
        return [event async for event in router.generate("req", PROMPT, params)]
    return asyncio.run(run())


def token_ids(events):
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def make_router(decode: WorkerPool, prefill: WorkerPool | None = None, **kwargs) -> Router:
    return Router(decode, prefill, local_prefill_max_tokens=8, request_timeout=30.0,
                  **kwargs)


def test_a_colocated_request_streams_its_tokens_and_finish():
    a = FakeDecode(colocated_run(TOKENS))
    events = collect(make_router(pool("decode", a=a)))
    assert token_ids(events) == TOKENS
    assert events[-1] == FinishEvent("length", len(PROMPT), len(TOKENS))
    assert not a.requests[0].remote_prefill and a.calls[0].cancelled  # closed at the end


# ----- prefill retries ----------------------------------------------------------------------

def disaggregated_run(request):
    """The decode side of a remote prefill: a lease, then tokens 2..N and the finish."""
    assert request.remote_prefill
    return [decode_pb2.GenerateResponse(reserved=decode_pb2.Reserved(lease_id="lease"))] + \
        [token(i + 1, t) for i, t in enumerate(TOKENS[1:])] + [finished(len(TOKENS))]


# DECODE_GONE is retried too, but on the best prefill worker, this one included
# (tests/unit/test_drain.py): the decode worker failed, not it.
@pytest.mark.parametrize("code", sorted(worker_calls.RETRYABLE - {worker_calls.DECODE_GONE},
                                        key=lambda c: c.name))
def test_a_prefill_failing_with_a_retryable_status_is_retried_on_another(code):
    decode = FakeDecode(disaggregated_run, disaggregated_run)
    first, second = FakePrefill(rpc_error(code)), FakePrefill(TOKENS[0])
    prefill = pool("prefill", p1=first, p2=second)
    prefill.workers["p2"].health.queued_prompt_tokens = 10_000  # p1 is picked first
    events = collect(make_router(pool("decode", d=decode), prefill))
    assert token_ids(events) == TOKENS
    assert len(first.requests) == len(second.requests) == 1
    # The first attempt's lease is given up, and the retry has a request id of its own.
    assert decode.calls[0].cancelled
    assert decode.requests[1].request_id == "req-retry"
    assert prefill.workers["p1"].healthy == (code not in worker_calls.WORKER_DOWN)
    assert any(isinstance(e, PrefillEvent) and e.worker == "p2" for e in events)


def test_a_prefill_failing_twice_ends_the_request():
    decode = FakeDecode(disaggregated_run, disaggregated_run)
    prefill = pool("prefill", p1=FakePrefill(rpc_error(grpc.StatusCode.INTERNAL)),
                   p2=FakePrefill(rpc_error(grpc.StatusCode.INTERNAL)))
    with pytest.raises(APIError) as info:
        collect(make_router(pool("decode", d=decode), prefill))
    assert info.value.status == 502 and all(call.cancelled for call in decode.calls)


def test_a_prefill_refusing_the_request_is_not_retried():
    decode = FakeDecode(disaggregated_run, disaggregated_run)
    second = FakePrefill(TOKENS[0])
    prefill = pool("prefill", p1=FakePrefill(rpc_error(grpc.StatusCode.INVALID_ARGUMENT)),
                   p2=second)
    prefill.workers["p2"].health.queued_prompt_tokens = 10_000
    with pytest.raises(APIError) as info:
        collect(make_router(pool("decode", d=decode), prefill))
    assert info.value.status == 400 and not second.requests


# ----- migration ----------------------------------------------------------------------------

def resumed_run(request):
    """A decode worker taking over: it recomputes the prompt and the tokens sent, then
    goes on from the next one."""
    sent = list(request.resume_token_ids)
    assert not request.remote_prefill and sent == TOKENS[:len(sent)]
    return colocated_run(TOKENS[len(sent):], start=len(sent))(request)


@pytest.mark.parametrize("sent", range(1, len(TOKENS)))
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED])
def test_a_decode_worker_failing_mid_stream_is_migrated(sent, code):
    a = FakeDecode(colocated_run(TOKENS[:sent], then=rpc_error(code)))
    b = FakeDecode(resumed_run)
    decode = pool("decode", a=a, b=b)
    decode.workers["b"].health.free_kv_blocks = 10  # a is picked first
    migrations = []
    events = collect(make_router(decode, on_migrate=lambda: migrations.append(1)))
    assert token_ids(events) == TOKENS  # the client sees one uninterrupted stream
    assert list(b.requests[0].resume_token_ids) == TOKENS[:sent]
    assert b.requests[0].request_id == "req-m1" and migrations == [1]
    assert events[-1] == FinishEvent("length", len(PROMPT), len(TOKENS))


def test_a_stream_ended_without_a_finish_is_migrated_too():
    a = FakeDecode(lambda request: [token(0, TOKENS[0])])  # EOF after one token
    b = FakeDecode(resumed_run)
    decode = pool("decode", a=a, b=b)
    decode.workers["b"].health.free_kv_blocks = 10
    assert token_ids(collect(make_router(decode))) == TOKENS


def test_migrations_stop_at_the_limit():
    failing = colocated_run(TOKENS[:1], then=rpc_error(grpc.StatusCode.UNAVAILABLE))
    a, b = FakeDecode(failing), FakeDecode(
        lambda r: colocated_run(TOKENS[1:2], start=1,
                                then=rpc_error(grpc.StatusCode.UNAVAILABLE))(r))
    c = FakeDecode(resumed_run)
    decode = pool("decode", a=a, b=b, c=c)
    decode.workers["b"].health.free_kv_blocks = 50
    decode.workers["c"].health.free_kv_blocks = 10
    with pytest.raises(APIError) as info:
        collect(make_router(decode, migration_limit=1))
    assert info.value.status == 503 and not c.requests  # a, then b, then no more


def test_no_migration_at_limit_zero():
    a = FakeDecode(colocated_run(TOKENS[:2], then=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    b = FakeDecode(resumed_run)
    with pytest.raises(APIError):
        collect(make_router(pool("decode", a=a, b=b), migration_limit=0))
    assert not b.requests


def test_a_request_that_had_all_its_tokens_ends_on_the_next_worker_without_new_tokens():
    """The worker failed between its last token and its finish: the gateway does not
    decide that the request is over (the engine's rule does); the next worker gets every
    token sent and answers with the finish alone."""
    a = FakeDecode(colocated_run(TOKENS, then=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    b = FakeDecode(resumed_run)
    events = collect(make_router(pool("decode", a=a, b=b)))
    assert token_ids(events) == TOKENS
    assert list(b.requests[0].resume_token_ids) == TOKENS
    assert events[-1] == FinishEvent("length", len(PROMPT), len(TOKENS))


def test_the_finish_reason_is_the_resumed_workers():
    a = FakeDecode(colocated_run([101, 2], then=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    b = FakeDecode(lambda request: [decode_pb2.GenerateResponse(finished=decode_pb2.Finished(
        finish_reason=decode_pb2.FINISH_REASON_STOP, prompt_tokens=len(PROMPT),
        completion_tokens=len(request.resume_token_ids)))])
    events = collect(make_router(pool("decode", a=a, b=b)))
    assert token_ids(events) == [101, 2] and list(b.requests[0].resume_token_ids) == [101, 2]
    assert events[-1] == FinishEvent("stop", len(PROMPT), 2)


def test_a_worker_that_stalls_and_leaves_the_rotation_is_migrated(monkeypatch):
    monkeypatch.setattr(worker_calls, "STALL_CHECK_SECONDS", 0.01)
    a = FakeDecode(colocated_run(TOKENS[:2], then=HANG))
    b = FakeDecode(resumed_run)
    decode = pool("decode", a=a, b=b)
    decode.workers["b"].health.free_kv_blocks = 10

    async def run():
        async def health_poll_fails():  # what the pool does once Health stops answering
            while not a.calls or a.calls[0].items:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            decode.report_failure(decode.workers["a"], "DEADLINE_EXCEEDED")
        poller = asyncio.create_task(health_poll_fails())
        events = [e async for e in make_router(decode).generate("req", PROMPT, PARAMS)]
        await poller
        return events

    events = asyncio.run(run())
    assert token_ids(events) == TOKENS
    assert list(b.requests[0].resume_token_ids) == TOKENS[:2]
