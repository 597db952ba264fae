"""The decode worker's token stream when the engine runs ahead of the gRPC handler.

The engine thread queues outputs; the Generate handler reads them later. By then the
sequence may hold more tokens than the output being read, so the stream must number
tokens by the output, not by the sequence. (It once did the latter: with a remote
prefill, the first token, already sent by the prefill worker, went out a second time
and `usage.completion_tokens` was max_tokens + 1.)
"""

import asyncio

from decode_worker.service import DecodeService
from engine.sampling_params import SamplingParams
from pdserve_proto.v1 import decode_pb2
from tests.unit.conftest import tiny_engine
from worker.engine_loop import EngineLoop


def _stream_after_engine_ran_ahead(remote_prefill: bool, max_tokens: int):
    """Every step's outputs are queued before the handler reads the first of them."""

    async def scenario():
        engine = tiny_engine(kv_cache_tokens=256, seed=1)
        service = DecodeService(EngineLoop(engine, asyncio.get_running_loop()), None, 30.0)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request("r1", [5, 6, 7, 8, 9, 10], params)
        queue: asyncio.Queue = asyncio.Queue()
        while engine.has_unfinished_requests():
            for output in engine.step():
                queue.put_nowait(output)
        request = decode_pb2.GenerateRequest(request_id="r1", remote_prefill=remote_prefill)
        messages = [m async for m in service._stream(queue, request, 0.0)]
        return engine.requests, messages

    return asyncio.run(scenario())


def _tokens(messages):
    return [(m.token.index, m.token.token_id) for m in messages
            if m.WhichOneof("item") == "token"]


def test_remote_prefill_stream_skips_only_the_first_token():
    _, messages = _stream_after_engine_ran_ahead(remote_prefill=True, max_tokens=4)
    colocated = _tokens(_stream_after_engine_ran_ahead(remote_prefill=False, max_tokens=4)[1])
    assert [index for index, _ in colocated] == [0, 1, 2, 3]
    # Tokens 2..4 exactly once each: the prefill worker has sent token 1.
    assert _tokens(messages) == colocated[1:]
    finished = messages[-1].finished
    assert (finished.finish_reason, finished.completion_tokens) == (
        decode_pb2.FINISH_REASON_LENGTH, 4)


def test_colocated_stream_numbers_every_token_once():
    _, messages = _stream_after_engine_ran_ahead(remote_prefill=False, max_tokens=3)
    assert [index for index, _ in _tokens(messages)] == [0, 1, 2]
    assert messages[-1].finished.completion_tokens == 3
