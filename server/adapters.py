"""The LoRA adapters the gateway serves: which `model` names select one, what
/v1/models lists, and the admin calls that load and unload one on every worker.

Workers register adapters (`--lora` at start, LoadLora at run time) and list them in
Health; the pools keep each worker's list (server.pool.Worker.loras) and placement
sends a request only to workers that hold its adapter. An adapter loaded through
/v1/load_lora_adapter is remembered here with its folder, so that a worker that lacks
it (restarted, or joined the pool since) is asked to load it when a request names it.
"""

import asyncio
import logging

import grpc

from pdserve_proto.v1 import common_pb2
from server.errors import APIError
from server.pool import Worker, WorkerPool

log = logging.getLogger("pdserve.gateway.lora")

# Seconds a worker may take to load an adapter (it reads and checks the folder between
# two engine steps).
LOAD_TIMEOUT = 120.0


class GatewayAdapters:
    def __init__(self, decode: WorkerPool, prefill: WorkerPool | None, base_names: set[str]):
        self.decode = decode
        self.pools = [pool for pool in (decode, prefill) if pool is not None]
        self.base_names = base_names  # `model` names of the base model: never an adapter's
        self.paths: dict[str, str] = {}  # loaded through the admin endpoint: name -> folder
        self._loading: dict[tuple[str, str], asyncio.Task] = {}

    def known(self) -> dict[str, str | None]:
        """Every adapter a request may name, with its folder where this gateway loaded
        it (None: a worker's own --lora): those of the admin endpoint and those a
        worker in the rotation lists."""
        names: dict[str, str | None] = {
            name: None for pool in self.pools for w in pool.healthy() for name in w.loras}
        names.update(self.paths)
        return dict(sorted(names.items()))

    async def ensure(self, name: str) -> None:
        """Ask the workers in the rotation that lack adapter `name` to load it, where
        this gateway knows its folder; waits only when no decode worker holds it yet
        (nothing could serve the request before), else the loads go on behind it."""
        path = self.paths.get(name)
        if path is None:
            return
        loads = [self._load_once(worker, name, path) for pool in self.pools
                 for worker in pool.healthy() if name not in worker.loras]
        if loads and not self.decode.serving(name):
            await asyncio.wait(loads)

    def _load_once(self, worker: Worker, name: str, path: str) -> asyncio.Task:
        """One load per worker and adapter at a time, however many requests ask."""
        key = (worker.address, name)
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.ensure_future(
                self._load_quietly(worker, name, path))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return task

    async def _load_quietly(self, worker: Worker, name: str, path: str) -> None:
        try:
            worker.set_lora(name, await _load_on(worker, name, path))
        except grpc.aio.AioRpcError as exc:  # placement goes on without this worker
            log.warning("%s worker %s could not load LoRA adapter %r from %s: %s",
                        worker.role, worker.address, name, path, exc.details())

    # ----- the admin endpoints ----------------------------------------------------------

    async def load(self, name: str, path: str) -> str:
        """Load the adapter on every worker in the rotation, all or none: when one
        refuses it (the folder is missing or corrupt there), those that loaded it
        unload it again. Returns its digest."""
        if name in self.base_names:
            raise APIError(400, f"{name!r} is the base model's name; an adapter needs "
                                "another", param="lora_name", code="invalid_value")
        workers = self._everyone()
        answers = await asyncio.gather(*(_load_on(w, name, path) for w in workers),
                                       return_exceptions=True)
        loaded = [(w, a) for w, a in zip(workers, answers, strict=True) if isinstance(a, str)]
        failed = [(w, a) for w, a in zip(workers, answers, strict=True)
                  if not isinstance(a, str)]
        digests = {digest for _, digest in loaded}
        if failed or len(digests) > 1:
            await asyncio.gather(*(_unload_on(w, name) for w, _ in loaded),
                                 return_exceptions=True)
            for worker, _ in loaded:
                worker.set_lora(name, None)
        if failed:
            raise _load_error(name, *failed[0])
        if len(digests) > 1:
            raise APIError(400, f"the workers read different files at {path!r} for LoRA "
                                f"adapter {name!r}: every worker needs the same adapter "
                                "there", param="lora_path", code="invalid_value")
        for worker, digest in loaded:
            worker.set_lora(name, digest)
        self.paths[name] = path
        log.info("LoRA adapter %r loaded from %s on %d worker(s)", name, path, len(loaded))
        return digests.pop()

    async def unload(self, name: str) -> None:
        """Unload the adapter from every worker that has it; 404 when none does, 400 with
        the worker's message when one refuses (unfinished requests use it there)."""
        if name not in self.known():
            raise APIError(404, f"the LoRA adapter {name!r} cannot be found",
                           param="lora_name", code="model_not_found")
        path = self.paths.pop(name, None)  # first: no request asks for it to be loaded again
        holders = [w for pool in self.pools for w in pool.workers.values() if name in w.loras]
        answers = await asyncio.gather(*(_unload_on(w, name) for w in holders),
                                       return_exceptions=True)
        refused = None
        for worker, answer in zip(holders, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError) \
                    and answer.code() != grpc.StatusCode.NOT_FOUND:
                refused = refused or (worker, answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                worker.set_lora(name, None)
        if refused is not None:
            if path is not None:
                self.paths[name] = path  # still served where it could not be unloaded
            worker, exc = refused
            raise APIError(400 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 502,
                           f"{worker.role} worker {worker.address} kept LoRA adapter "
                           f"{name!r}: {exc.details()}", param="lora_name",
                           code="invalid_value")
        log.info("LoRA adapter %r unloaded", name)

    def _everyone(self) -> list[Worker]:
        workers = [w for pool in self.pools for w in pool.healthy()]
        if not workers:
            raise APIError(503, "no healthy worker to load the adapter on",
                           code="no_worker", headers={"Retry-After": "1"})
        return workers


async def _load_on(worker: Worker, name: str, path: str) -> str:
    answer = await worker.stub.LoadLora(common_pb2.LoadLoraRequest(name=name, path=path),
                                        timeout=LOAD_TIMEOUT)
    return answer.digest


async def _unload_on(worker: Worker, name: str) -> None:
    await worker.stub.UnloadLora(common_pb2.UnloadLoraRequest(name=name),
                                 timeout=LOAD_TIMEOUT)


def _load_error(name: str, worker: Worker, exc: BaseException) -> APIError:
    """A worker's refusal as the admin's answer: the engine's message (which names the
    file at fault) for a bad folder, 502 for a worker that failed."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        raise exc
    details = exc.details() or exc.code().name
    if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                      grpc.StatusCode.FAILED_PRECONDITION):
        return APIError(400, f"cannot load LoRA adapter {name!r}: {details}",
                        param="lora_path", code="invalid_value")
    return APIError(502, f"{worker.role} worker {worker.address} failed to load LoRA "
                         f"adapter {name!r}: {details}", code=exc.code().name.lower())
