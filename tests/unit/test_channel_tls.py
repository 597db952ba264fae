"""Mutual TLS between real gRPC endpoints on loopback with throwaway certificates: a
server secured by SecurityConfig answers only a caller holding a certificate of the same
CA, and a caller trusts only a server holding one; the settings' own checks."""

import asyncio

import grpc
import pytest

from pdserve_config.security import SecurityConfig
from pdserve_proto.v1 import common_pb2, decode_pb2_grpc
from tests.support.tls_certs import Authority


class Decode(decode_pb2_grpc.DecodeServiceServicer):
    async def Health(self, request, context):
        return common_pb2.HealthResponse(role="decode")


async def health_over(server_security: SecurityConfig, client_channel) -> str:
    """'OK' or the status code of one Health call over `client_channel(address)`."""
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(Decode(), server)
    port = server.add_secure_port("127.0.0.1:0", server_security.server_credentials())
    await server.start()
    try:
        async with client_channel(f"127.0.0.1:{port}") as channel:
            try:
                await decode_pb2_grpc.DecodeServiceStub(channel).Health(
                    common_pb2.HealthRequest(), timeout=5)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create(folder / "ca"), Authority.create(folder / "other", "other CA")
    return {"server": ca.security(folder, "worker"), "client": ca.security(folder, "gateway"),
            "stranger": other.security(folder, "stranger"), "ca": ca, "folder": folder}


def test_a_client_with_a_certificate_of_the_ca_is_served(pki):
    assert asyncio.run(health_over(pki["server"], pki["client"].aio_channel)) == "OK"


def test_a_plaintext_client_is_refused(pki):
    assert asyncio.run(health_over(pki["server"], grpc.aio.insecure_channel)) == "UNAVAILABLE"


def test_a_tls_client_without_a_certificate_is_refused(pki):
    ca_only = grpc.ssl_channel_credentials(root_certificates=pki["ca"].path.read_bytes())
    outcome = asyncio.run(health_over(
        pki["server"], lambda address: grpc.aio.secure_channel(address, ca_only)))
    assert outcome == "UNAVAILABLE"


def test_certificates_of_another_ca_are_refused_both_ways(pki):
    # A caller whose certificate another CA signed...
    assert asyncio.run(health_over(pki["server"], pki["stranger"].aio_channel)) == "UNAVAILABLE"
    # ...and a server whose certificate another CA signed: the caller sends it nothing
    # (how a prefill worker refuses to push KV to a decode worker not of its CA).
    assert asyncio.run(health_over(pki["stranger"], pki["client"].aio_channel)) == "UNAVAILABLE"


def test_server_name_override_checks_the_certificate_against_that_name(pki):
    folder, ca = pki["folder"], pki["ca"]
    cert, key = ca.issue(folder, "named", hosts=("pdserve-worker",))
    named = SecurityConfig(tls_ca=str(ca.path), tls_cert=str(cert), tls_key=str(key))
    # Dialled by IP, a certificate for a name only fails the check...
    assert asyncio.run(health_over(named, pki["client"].aio_channel)) == "UNAVAILABLE"
    # ...unless the caller is told the name to expect.
    renamed = SecurityConfig(tls_ca=pki["client"].tls_ca, tls_cert=pki["client"].tls_cert,
                             tls_key=pki["client"].tls_key, tls_server_name="pdserve-worker")
    assert asyncio.run(health_over(named, renamed.aio_channel)) == "OK"


def test_tls_settings_come_all_three_or_not_at_all(pki):
    client = pki["client"]
    with pytest.raises(ValueError, match="missing --tls-key"):
        SecurityConfig(tls_ca=client.tls_ca, tls_cert=client.tls_cert)
    with pytest.raises(ValueError, match="--tls-cert /nonexistent.pem: no such file"):
        SecurityConfig(tls_ca=client.tls_ca, tls_cert="/nonexistent.pem",
                       tls_key=client.tls_key)
    with pytest.raises(ValueError, match="--tls-server-name needs mutual TLS"):
        SecurityConfig(tls_server_name="x")
    assert not SecurityConfig(tls_ca="", tls_cert="", tls_key="").tls
