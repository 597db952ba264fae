"""The LoRA adapters a worker serves, for both services: which names requests may use,
the KV fingerprint of each, Health's list, and LoadLora / UnloadLora.

The registry itself is the engine's (engine/lora.py); this keeps a copy of its names and
digests on the event loop, so that a request's checks never wait for the engine thread.
The copy changes only where the registry does: at start (--lora) and through the two
RPCs here, which run the engine's load and unload on the engine thread, between steps.
"""

import logging

import grpc

from engine.errors import InvalidRequestError
from kvtransfer.codec import with_adapter
from pdserve_proto.v1 import common_pb2
from worker.engine_loop import EngineLoop
from worker.status import StatusError, status_of

log = logging.getLogger("pdserve.worker.lora")


class WorkerAdapters:
    def __init__(self, engine_loop: EngineLoop):
        self.loop = engine_loop
        # Read before the engine thread runs (services are made before it starts).
        self.digests: dict[str, str] = dict(engine_loop.engine.loras())

    def digest(self, name: str) -> str | None:
        """The digest of the adapter a request names ("" names the base model: None);
        a NOT_FOUND StatusError for a name not registered here."""
        if not name:
            return None
        if name not in self.digests:
            known = ", ".join(sorted(self.digests)) or "none"
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {name!r} is not "
                              f"registered on this worker (registered: {known})")
        return self.digests[name]

    def fingerprint(self, base, name: str):
        """The KV fingerprint of a request run under adapter `name` ("": the base)."""
        return with_adapter(base, name or None, self.digest(name))

    def health_entries(self) -> list:
        resident = _resident(self.loop.engine)
        return [common_pb2.LoraAdapter(name=name, digest=digest, resident=name in resident)
                for name, digest in sorted(self.digests.items())]

    async def load(self, request, context):
        """LoadLora: the engine loads (and so checks) the folder on its thread."""
        name, path = request.name, request.path
        if not name or not path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "LoadLora needs both a name and a path")
        try:
            digest = await self.loop.call(lambda e: e.load_lora(name, path))
        except InvalidRequestError as exc:  # a bad folder (LoraError), a name in use
            log.warning("LoRA adapter %r from %s refused: %s", name, path, exc)
            await status_of(exc).abort(context)
        self.digests = dict(await self.loop.call(lambda e: e.loras()))
        log.info("LoRA adapter %r loaded from %s (digest %s)", name, path, digest[:12])
        return common_pb2.LoadLoraResponse(digest=digest)

    async def unload(self, request, context):
        name = request.name
        try:
            await self.loop.call(lambda e: e.unload_lora(name))
        except InvalidRequestError as exc:  # not registered (NOT_FOUND), or in use
            await status_of(exc).abort(context)
        self.digests = dict(await self.loop.call(lambda e: e.loras()))
        log.info("LoRA adapter %r unloaded", name)
        return common_pb2.UnloadLoraResponse()


def _resident(engine) -> frozenset:
    """Names of the adapters whose weights are in memory (copied off the engine thread's
    dict: a copy that races a change is skipped, Health's flag is advisory)."""
    try:
        return frozenset(engine.resident_loras())
    except RuntimeError:  # the engine thread changed the set while we copied it
        return frozenset()
