"""KV transfer on loopback: raw gRPC bytes vs pdserve's KV stream, and the transfer
tail with layer-wise streaming on and off. Every figure comes from the same run.

    .venv/bin/python bench/kv_transfer.py [--prompt-tokens 2048] [--rounds 3]

1. raw: a client stream of `--chunk-bytes` messages of plain bytes into a sink in
   another process, as many bytes as the prompt's KV.
2. kv: the prompt's KV (default model, float32: 30 layers x 1536 bytes per token) sent
   by pdserve's sender (encode, CRC-32) to a real decode worker, which checks every
   chunk and writes it into its reserved blocks, until its acknowledgement.
3. tail: a real prefill worker runs the prompt and streams the KV to a decode worker;
   the tail is from the first token being sampled (prefill compute over) to the decode
   worker acknowledging the complete KV. Once with --no-layerwise, the baseline.
Each worker gets one thread; figures are the best of `--rounds`.
"""

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.sampling_params import SamplingParams  # noqa: E402
from kvtransfer.codec import KvShape, make_fingerprint  # noqa: E402
from kvtransfer.sender import KvSender  # noqa: E402
from pdserve.launch import ChildProcess, pdserve_argv  # noqa: E402
from pdserve_config.security import SecurityConfig  # noqa: E402
from pdserve_proto.limits import MESSAGE_SIZE_OPTIONS as GRPC_OPTIONS  # noqa: E402
from pdserve_proto.v1 import common_pb2, decode_pb2, kv_pb2  # noqa: E402
from worker.convert import params_to_proto  # noqa: E402

RAW_METHOD = "/bench.Sink/Push"
# SmolLM2-135M: what one token of one layer weighs on the wire in float32.
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
# No prefix cache: every round must compute and send the whole prompt again.
ENGINE_ARGS = ("--model", "default", "--dtype", "float32", "--quantization", "none",
               "--kv-cache-tokens", "8192", "--max-num-batched-tokens", "512",
               "--no-prefix-caching")
START_TIMEOUT = 300


def start_worker(role: str, *args: str) -> ChildProcess:
    """A worker with one thread on a free port; its address is `.address`. Its gRPC is
    open whatever this shell's PDSERVE_INTERNAL_TOKEN / PDSERVE_TLS_*: the benchmark's
    plaintext channels are its only callers, on loopback."""
    secured = {"PDSERVE_" + f.name.upper() for f in dataclasses.fields(SecurityConfig)}
    env = {k: v for k, v in os.environ.items() if k not in secured}
    child = ChildProcess(role, pdserve_argv("--log-level", "WARNING", role, "--port", "0",
                                            "--num-threads", "1", *args), env=env)
    child.wait_listening(START_TIMEOUT)
    return child


async def raw_sink(port: int) -> None:
    async def push(request_iterator, context):
        total = 0
        async for chunk in request_iterator:
            total += len(chunk)
        return total.to_bytes(8, "little")

    handler = grpc.stream_unary_rpc_method_handler(push)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Sink", {"Push": handler})])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"sink listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


async def raw_rate(address: str, total: int, chunk_bytes: int) -> float:
    payload = bytes(chunk_bytes)
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        push = channel.stream_unary(RAW_METHOD)

        async def chunks():
            for offset in range(0, total, chunk_bytes):
                yield payload[:min(chunk_bytes, total - offset)]

        start = time.perf_counter()
        received = int.from_bytes(await push(chunks()), "little")
        elapsed = time.perf_counter() - start
    assert received == total, (received, total)
    return total / elapsed


async def kv_rate(decode: ChildProcess, tokens: int, chunk_bytes: int) -> float:
    from pdserve_proto.v1 import decode_pb2_grpc

    params = SamplingParams(max_tokens=1, temperature=0)
    async with grpc.aio.insecure_channel(decode.address, options=GRPC_OPTIONS) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        rid = f"kv-{time.monotonic_ns()}"
        stream = stub.Generate(decode_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=[1] * tokens, params=params_to_proto(params),
            remote_prefill=True))
        reserved = (await stream.read()).reserved
        shape = KvShape(LAYERS, KV_HEADS, HEAD_DIM, torch.float32)
        header = kv_pb2.KvHeader(request_id=rid, lease_id=reserved.lease_id,
                                 fingerprint=make_fingerprint("llama", shape,
                                                              reserved.model_digest),
                                 num_tokens=tokens)
        sender = KvSender(channel, header, asyncio.get_running_loop(),
                          max_chunk_bytes=chunk_bytes)
        layers = [torch.randn(2, tokens, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]
        start = time.perf_counter()
        for index, kv in enumerate(layers):
            sender.put(index, 0, kv[0], kv[1])
        sender.finish(common_pb2.Token(token_id=2, index=0))
        ack = await sender.send()
        elapsed = time.perf_counter() - start
        while await stream.read() != grpc.aio.EOF:
            pass
    assert ack.bytes_received == tokens * LAYERS * shape.token_bytes
    return ack.bytes_received / elapsed


async def tail(prefill: ChildProcess, decode: ChildProcess, prompt: list[int], rid: str):
    """The gateway's path over grpc.aio; returns the prefill worker's timings."""
    from pdserve_proto.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    params = params_to_proto(SamplingParams(max_tokens=1, temperature=0))
    async with grpc.aio.insecure_channel(decode.address) as dch, \
            grpc.aio.insecure_channel(prefill.address) as pch:
        stream = decode_pb2_grpc.DecodeServiceStub(dch).Generate(decode_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=prompt, params=params, remote_prefill=True))
        reserved = (await stream.read()).reserved
        response = await prefill_pb2_grpc.PrefillServiceStub(pch).Prefill(
            prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, params=params,
                                       decode_address=decode.address,
                                       lease_id=reserved.lease_id), timeout=600)
        while await stream.read() != grpc.aio.EOF:
            pass
    return response


async def measure(args, sink_address: str, decode: ChildProcess, streaming: ChildProcess,
                  batched: ChildProcess, total: int):
    """Everything in one event loop: grpc.aio and sync gRPC do not mix in one process."""
    raw = kv = 0.0
    for _ in range(args.rounds):
        raw = max(raw, await raw_rate(sink_address, total, args.chunk_bytes))
        kv = max(kv, await kv_rate(decode, args.prompt_tokens, args.chunk_bytes))
    prompt = [(i * 7919) % 40000 + 100 for i in range(args.prompt_tokens)]
    on = off = None
    for i in range(args.rounds):
        a = await tail(streaming, decode, prompt, f"on-{i}")
        b = await tail(batched, decode, prompt, f"off-{i}")
        on = a if on is None or a.transfer_tail_seconds < on.transfer_tail_seconds else on
        off = b if off is None or b.transfer_tail_seconds < off.transfer_tail_seconds else off
    return raw, kv, on, off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--raw-sink-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_sink_server is not None:
        asyncio.run(raw_sink(args.raw_sink_server))
        return

    total = args.prompt_tokens * LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    chunk = ("--kv-chunk-bytes", str(args.chunk_bytes))
    sink = ChildProcess("sink", [sys.executable, __file__, "--raw-sink-server", "0"])
    sink.wait_listening(START_TIMEOUT)
    decode = start_worker("decode", *ENGINE_ARGS)
    streaming = start_worker("prefill", *ENGINE_ARGS, *chunk)
    batched = start_worker("prefill", *ENGINE_ARGS, *chunk, "--no-layerwise")
    try:
        raw, kv, on, off = asyncio.run(measure(args, sink.address, decode, streaming, batched,
                                               total))
    finally:
        for child in (sink, decode, streaming, batched):
            child.stop()
    mb = 1e6
    print(f"loopback, {args.prompt_tokens}-token prompt of the default model in float32 "
          f"({total / mb:.1f} MB of KV), {args.chunk_bytes}-byte chunks, best of "
          f"{args.rounds}")
    print(f"raw gRPC bytes stream      {raw / mb:8.1f} MB/s")
    print(f"pdserve KV stream          {kv / mb:8.1f} MB/s   ({kv / raw:.0%} of raw)")
    print(f"tail, layer-wise streaming {on.transfer_tail_seconds * 1e3:8.1f} ms   "
          f"(prefill compute {on.compute_seconds * 1e3:.0f} ms)")
    print(f"tail, after the prompt     {off.transfer_tail_seconds * 1e3:8.1f} ms   "
          f"(prefill compute {off.compute_seconds * 1e3:.0f} ms)")
    print(f"tail ratio                 {on.transfer_tail_seconds / off.transfer_tail_seconds:8.0%}")


if __name__ == "__main__":
    main()
