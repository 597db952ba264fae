"""Fault injection against real worker processes on loopback: corrupted and mismatched
KV, expired leases, a decode worker killed mid-transfer, cancellation mid-transfer and
mid-decode, a full decode worker and bad input. Every failure must carry the right gRPC
status and a message naming the problem, and every KV block must end up free again."""

import queue
import random
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from engine.presets import SMOLLM2_VOCAB, random_hf_config
from engine.sampling_params import SamplingParams
from kvtransfer.codec import LAYOUT_VERSION, encode_layer
from pdserve_proto.v1 import common_pb2, decode_pb2, kv_pb2, prefill_pb2
from tests.support.workers import Worker, gen_request
from worker.convert import params_to_proto

pytestmark = pytest.mark.timeout(180)

# float32 pinned: `auto` is bf16 on CPUs with bf16 units, and the dtype-mismatch test
# needs the workers' dtype to differ from prefill_bf16's whatever the machine.
TINY = ("--model", "random:tiny", "--dtype", "float32")
TINY_CFG = random_hf_config("tiny")
CALL_TIMEOUT = 30  # seconds; any call that hangs fails its test instead of blocking it
GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)


def start_workers(**specs: tuple[str, ...]) -> SimpleNamespace:
    """Start workers in parallel (startup is mostly imports); name -> (role, *args)."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(Worker, *spec) for name, spec in specs.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        stop_workers(started.values())
        raise failed[0]
    return SimpleNamespace(**started)


def stop_workers(workers) -> None:
    workers = list(workers)
    with ThreadPoolExecutor(max(len(workers), 1)) as pool:
        list(pool.map(Worker.stop, workers))


@pytest.fixture(scope="module")
def w():
    """The shared tiny workers; every test leaves them idle."""
    workers = start_workers(
        decode=("decode", *TINY, "--kv-cache-tokens", "8192"),
        prefill=("prefill", *TINY, "--kv-cache-tokens", "4096"),
        prefill_bf16=("prefill", *TINY, "--kv-cache-tokens", "1024", "--dtype", "bfloat16"),
        prefill_seed1=("prefill", *TINY, "--kv-cache-tokens", "1024", "--seed", "1"),
        # 16 blocks of 16 tokens: one 200-token prompt fills most of it.
        small=("decode", *TINY, "--kv-cache-tokens", "256", "--lease-timeout", "1"),
    )
    yield workers
    stop_workers(vars(workers).values())


# ----- helpers ----------------------------------------------------------------------------


def assert_idle(*workers: Worker) -> None:
    for worker in workers:
        assert worker.proc.poll() is None, f"{worker.role} worker died"
        health = worker.wait_idle()
        assert health.free_kv_blocks == health.total_kv_blocks, (worker.role, health)
        assert (health.running, health.waiting, health.leases) == (0, 0, 0), (worker.role,
                                                                              health)


def prompt_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, SMOLLM2_VOCAB) for _ in range(n)]


def reserve(decode: Worker, rid: str, prompt: list[int], params=GREEDY,
            lease_timeout: float = 0.0, timeout: float = CALL_TIMEOUT):
    """Open Generate(remote_prefill) and read the Reserved message; returns (stream, it)."""
    stream = decode.stub.Generate(gen_request(rid, prompt, params, True, lease_timeout),
                                  timeout=timeout)
    first = next(stream)
    assert first.HasField("reserved"), first
    return stream, first.reserved


def prefill_request(rid: str, prompt: list[int], decode: Worker, lease_id: str,
                    params=GREEDY):
    return prefill_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params),
        decode_address=decode.address, lease_id=lease_id)


def rpc_error(fn) -> grpc.RpcError:
    """The RpcError that fn() raises (fails the test when it raises none)."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def stream_error(stream) -> grpc.RpcError:
    """Read a stream to its end, which must be an error status rather than Finished."""
    return rpc_error(lambda: [msg for msg in stream])


def tokens(stream, n: int) -> list[int]:
    """The next n tokens of a Generate stream (fails on Finished or an error)."""
    ids = []
    while len(ids) < n:
        msg = next(stream)
        assert msg.HasField("token"), msg
        ids.append(msg.token.token_id)
    return ids


def tiny_header(rid: str, reserved, num_tokens: int):
    """A KvHeader as a float32 random:tiny prefill worker would send it."""
    fingerprint = kv_pb2.KvFingerprint(
        architecture="llama", num_layers=TINY_CFG.num_hidden_layers,
        num_kv_heads=TINY_CFG.num_key_value_heads, head_dim=TINY_CFG.head_dim,
        dtype="float32", layout_version=LAYOUT_VERSION, model_digest=reserved.model_digest)
    return kv_pb2.PushKvRequest(header=kv_pb2.KvHeader(
        request_id=rid, lease_id=reserved.lease_id, fingerprint=fingerprint,
        num_tokens=num_tokens))


def tiny_chunks(num_tokens: int, layers=None) -> list:
    """PushKv chunk messages of random K/V, several chunks per layer."""
    gen = torch.Generator().manual_seed(num_tokens)
    shape = (num_tokens, TINY_CFG.num_key_value_heads, TINY_CFG.head_dim)
    token_bytes = 2 * shape[1] * shape[2] * 4
    messages = []
    for layer in range(TINY_CFG.num_hidden_layers) if layers is None else layers:
        k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        messages += [kv_pb2.PushKvRequest(chunk=c)
                     for c in encode_layer(layer, 0, k, v, max_chunk_bytes=16 * token_bytes)]
    return messages


def trailer(num_chunks: int, token_id: int = 7):
    return kv_pb2.PushKvRequest(trailer=kv_pb2.KvTrailer(
        first_token=common_pb2.Token(token_id=token_id, index=0), num_chunks=num_chunks))


class Feed:
    """A request iterator the test feeds message by message while the call runs."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, *messages) -> None:
        for msg in messages:
            self._queue.put(msg)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (msg := self._queue.get(timeout=CALL_TIMEOUT)) is not None:
            yield msg


# ----- 1. corrupted chunk -----------------------------------------------------------------


def test_corrupted_chunk_is_data_loss(w):
    prompt = prompt_of(40)
    stream, reserved = reserve(w.decode, "corrupt", prompt)
    chunks = tiny_chunks(len(prompt))
    assert len(chunks) >= 4
    bad = chunks[len(chunks) // 2].chunk  # intact chunks go first and are written
    data = bytearray(bad.data)
    data[len(data) // 3] ^= 0x40
    bad.data = bytes(data)
    messages = [tiny_header("corrupt", reserved, len(prompt)), *chunks, trailer(len(chunks))]

    err = rpc_error(lambda: w.decode.stub.PushKv(iter(messages), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert "checksum" in err.details()
    assert f"layer {bad.layer} at position {bad.start}" in err.details()

    err = stream_error(stream)
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert "checksum" in err.details()
    assert_idle(w.decode)


# ----- 2. fingerprint mismatch ------------------------------------------------------------


def test_dtype_mismatch_is_failed_precondition(w):
    prompt = prompt_of(24, seed=2)
    # A short deadline: the stream must fail at once, not when the lease (30 s) expires.
    stream, reserved = reserve(w.decode, "bf16", prompt, timeout=10)
    # Same weights in another dtype: one digest, only the dtype differs.
    assert w.prefill_bf16.health().model_digest == reserved.model_digest

    err = rpc_error(lambda: w.prefill_bf16.stub.Prefill(
        prefill_request("bf16", prompt, w.decode, reserved.lease_id), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "dtype" in err.details() and "bfloat16" in err.details()
    assert "model_digest" not in err.details()
    assert w.decode.address in err.details()

    # The contract: any PushKv error fails the request's Generate stream too.
    err = stream_error(stream)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "dtype" in err.details()
    assert_idle(w.decode, w.prefill_bf16)


def test_other_weights_are_failed_precondition(w):
    prompt = prompt_of(24, seed=3)
    stream, reserved = reserve(w.decode, "seed1", prompt, timeout=10)
    other = w.prefill_seed1.health().model_digest
    assert other != reserved.model_digest

    err = rpc_error(lambda: w.prefill_seed1.stub.Prefill(
        prefill_request("seed1", prompt, w.decode, reserved.lease_id), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "model_digest" in err.details()
    assert other in err.details() and reserved.model_digest in err.details()
    assert "dtype" not in err.details()

    err = stream_error(stream)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "model_digest" in err.details()
    assert_idle(w.decode, w.prefill_seed1)


# ----- 3. lease expiry --------------------------------------------------------------------


def test_lease_expires_when_no_kv_arrives(w):
    prompt = prompt_of(50, seed=4)
    stream, reserved = reserve(w.small, "expire", prompt)
    assert reserved.expires_in_seconds == pytest.approx(1.0)
    assert w.small.health().leases == 1
    started = time.monotonic()

    err = stream_error(stream)
    assert time.monotonic() - started < 15  # the 1 s lease (slack for a busy machine)
    # The worker's status, not the client's 30 s deadline.
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    assert "expired" in err.details() and reserved.lease_id in err.details()
    assert_idle(w.small)

    err = rpc_error(lambda: w.prefill.stub.Prefill(
        prefill_request("expire", prompt, w.small, reserved.lease_id), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert reserved.lease_id in err.details() and "expired" in err.details()
    assert_idle(w.small, w.prefill)


# ----- 4. decode worker killed mid-transfer -----------------------------------------------


@pytest.fixture
def slow_pair():
    """Default model, prompt computed 64 tokens a step: a transfer that lasts."""
    workers = start_workers(
        prefill=("prefill", "--model", "default", "--kv-cache-tokens", "4096",
                 "--max-num-batched-tokens", "64"),
        decode=("decode", "--model", "default", "--kv-cache-tokens", "4096"),
    )
    yield workers
    stop_workers(vars(workers).values())


def test_decode_worker_killed_during_transfer(slow_pair):
    prefill, decode = slow_pair.prefill, slow_pair.decode
    prompt = prompt_of(1500, seed=5)
    stream, reserved = reserve(decode, "killed", prompt)
    call = prefill.stub.Prefill.future(prefill_request("killed", prompt, decode,
                                                       reserved.lease_id), timeout=120)
    # Wait until some chunks of the prompt are computed (and their KV sent).
    deadline = time.monotonic() + 30
    while (queued := prefill.health().queued_prompt_tokens) in (0, len(prompt)):
        assert not call.done(), call.exception() or call.result()
        assert time.monotonic() < deadline, "prefill never started"
        time.sleep(0.05)
    assert 0 < queued < len(prompt)

    decode.kill()
    killed = time.monotonic()
    err = rpc_error(lambda: call.result(timeout=20))
    assert time.monotonic() - killed < 10
    # ABORTED: the decode worker is gone, not this one (the gateway tells them apart).
    assert err.code() == grpc.StatusCode.ABORTED, err.details()
    assert decode.address in err.details()
    stream.cancel()
    assert_idle(prefill)


# ----- 5. Generate cancelled mid-transfer -------------------------------------------------


def test_cancel_generate_mid_transfer(w):
    prompt = prompt_of(64, seed=6)
    stream, reserved = reserve(w.decode, "cancel-kv", prompt)
    first = tiny_chunks(len(prompt), layers=[0])
    rest = tiny_chunks(len(prompt), layers=range(1, TINY_CFG.num_hidden_layers))
    feed = Feed()
    push = w.decode.stub.PushKv.future(iter(feed), timeout=CALL_TIMEOUT)
    try:
        feed.put(tiny_header("cancel-kv", reserved, len(prompt)), *first)
        time.sleep(0.5)  # let the header claim the lease and layer 0 land
        assert not push.done(), push.exception()

        stream.cancel()
        assert rpc_error(lambda: next(stream)).code() == grpc.StatusCode.CANCELLED
        assert_idle(w.decode)  # freed at once, while the KV stream is still open

        feed.put(*rest, trailer(len(first) + len(rest)))
        feed.close()
        err = rpc_error(lambda: push.result(timeout=CALL_TIMEOUT))
    finally:
        feed.close()
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert reserved.lease_id in err.details()
    assert "cancelled during the transfer" in err.details()
    assert_idle(w.decode)


# ----- 6. cancellation mid-decode ---------------------------------------------------------


def test_cancel_colocated_mid_decode(w):
    stream = w.decode.stub.Generate(gen_request("cancel-co", prompt_of(12, seed=7), LONG,
                                                False), timeout=CALL_TIMEOUT)
    assert len(tokens(stream, 5)) == 5
    assert w.decode.health().running == 1  # still decoding: nowhere near 2000 tokens
    stream.cancel()
    assert rpc_error(lambda: next(stream)).code() == grpc.StatusCode.CANCELLED
    assert_idle(w.decode)


def test_cancel_disaggregated_mid_decode(w):
    prompt = prompt_of(40, seed=8)
    stream, reserved = reserve(w.decode, "cancel-pd", prompt, LONG)
    response = w.prefill.stub.Prefill(prefill_request("cancel-pd", prompt, w.decode,
                                                      reserved.lease_id, LONG),
                                      timeout=CALL_TIMEOUT)
    assert response.kv_bytes > 0
    assert len(tokens(stream, 5)) == 5
    assert w.decode.health().running == 1
    stream.cancel()
    assert rpc_error(lambda: next(stream)).code() == grpc.StatusCode.CANCELLED
    assert_idle(w.decode, w.prefill)


# ----- 7. decode worker full --------------------------------------------------------------


def test_full_decode_worker_refuses_reservation_at_once(w):
    # The worker default is 1 s; this lease must outlive the test's second reservation.
    held, reserved = reserve(w.small, "full-1", prompt_of(200, seed=9), lease_timeout=60)
    assert reserved.expires_in_seconds == pytest.approx(60)
    health = w.small.health()
    assert health.leases == 1 and health.free_kv_blocks < 200 // health.block_size

    started = time.monotonic()
    err = rpc_error(lambda: reserve(w.small, "full-2", prompt_of(200, seed=10)))
    assert time.monotonic() - started < 20  # at once, not after the held 60 s lease
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "200 prompt tokens" in err.details() and "free" in err.details()
    # Refused before any prefill work: the prefill worker saw nothing.
    health = w.prefill.health()
    assert health.queued_prompt_tokens == 0 and health.running == 0
    assert_idle(w.prefill)
    assert w.small.health().leases == 1  # the refusal left the held lease alone

    held.cancel()
    assert rpc_error(lambda: next(held)).code() == grpc.StatusCode.CANCELLED
    assert_idle(w.small, w.prefill)


# ----- bad input --------------------------------------------------------------------------


def _params(**fields):
    msg = params_to_proto(GREEDY)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


BAD_INPUT = {
    "empty-prompt": ([], _params(), "prompt_token_ids", "empty"),
    "token-past-vocab": ([5, SMOLLM2_VOCAB, 6], _params(), "prompt_token_ids", "vocabulary"),
    "negative-token": ([5, -1], _params(), "prompt_token_ids", "vocabulary"),
    "max-tokens-zero": ([5, 6, 7], _params(max_tokens=0), "max_tokens", ">= 1"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_invalid_argument(w, case):
    prompt, params, field, words = BAD_INPUT[case]
    for remote in (False, True):
        request = decode_pb2.GenerateRequest(request_id=f"bad-{case}-{remote}",
                                             prompt_token_ids=prompt, params=params,
                                             remote_prefill=remote)
        err = rpc_error(lambda r=request: next(w.decode.stub.Generate(r, timeout=CALL_TIMEOUT)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (remote, err.details())
        assert err.details().startswith(f"{field}:") and words in err.details(), err.details()

    request = prefill_pb2.PrefillRequest(request_id=f"bad-{case}", prompt_token_ids=prompt,
                                         params=params, decode_address=w.decode.address,
                                         lease_id="no-such-lease")
    err = rpc_error(lambda: w.prefill.stub.Prefill(request, timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}:") and words in err.details(), err.details()
    assert_idle(w.decode, w.prefill)  # both still answer Health, nothing held
