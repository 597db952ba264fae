"""DNS discovery: replicas behind one name join and leave the rotation on re-resolution.

The workers are real gRPC servers answering Health on three loopback addresses with one
port, as compose replicas or headless-Service pods do; the name's DNS answer is what
`socket.getaddrinfo` returns, which the test changes between refreshes."""

import asyncio
import socket

import grpc

from pdserve_proto.v1 import common_pb2, decode_pb2_grpc
from server.pool import WorkerPool

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


class Healthy(decode_pb2_grpc.DecodeServiceServicer):
    async def Health(self, request, context):
        return common_pb2.HealthResponse(role="decode", free_kv_blocks=10,
                                         total_kv_blocks=10, block_size=16)


async def start_replicas():
    port = None
    servers = []
    for host in HOSTS:
        server = grpc.aio.server()
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(Healthy(), server)
        port = server.add_insecure_port(f"{host}:{port or 0}")
        await server.start()
        servers.append(server)
    return servers, port


def test_replicas_join_and_leave_as_the_name_resolves(monkeypatch):
    answer: list[str] = []
    real = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host != "decode":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)

    async def scenario():
        servers, port = await start_replicas()
        pool = WorkerPool("decode", [f"decode:{port}"], poll_interval=1.0, resolve_interval=0)
        seen = []
        try:
            for hosts in (HOSTS[:2], HOSTS, HOSTS[2:]):
                answer[:] = hosts
                await pool.refresh()
                seen.append(sorted(a for a, w in pool.workers.items() if w.healthy))
        finally:
            await pool.close()
            for server in servers:
                await server.stop(None)
        return port, seen

    port, seen = asyncio.run(scenario())
    assert seen == [[f"{h}:{port}" for h in HOSTS[:2]], [f"{h}:{port}" for h in HOSTS],
                    [f"{HOSTS[2]}:{port}"]]
