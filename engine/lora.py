"""LoRA adapters served on one base model: which are registered, which are in memory.

Who calls what (all on the engine's thread):
- LLMEngine at start registers each `--lora NAME=PATH` (a bad folder fails the start
  with the file named), and `load_lora` / `unload_lora` at run time;
- LLMEngine.add_request / reserve call `acquire(name, in_use)` for a request that names
  an adapter: it makes the adapter resident (reading its folder again if it was
  evicted) before the request is queued, so a step never reads a disk;
- ModelRunner reads `resident` to build each step's engine.lora_batch.LoraBatch.

Residency: at most `max_resident` adapters stay in memory; acquiring one more evicts
the least recently acquired adapter that no unfinished sequence uses. When every
resident adapter is in use the bound is exceeded for as long as that lasts, rather
than failing requests (the running batch, at most max_num_seqs, bounds it anyway).

An adapter is known by its digest (engine.lora_weights.adapter_digest): a content hash
that names its KV blocks (pdserve_proto.prefix.adapter_namespace). A folder that
changed on disk while its adapter was evicted is refused when read again, since the
sequences and cached blocks under that name were computed with the old weights.
"""

from collections import OrderedDict
from collections.abc import Set
from pathlib import Path

import torch

from engine.errors import InvalidRequestError, LoraError, UnknownLoraError
from engine.lora_specs import check_name, parse_lora_specs, split_spec
from engine.lora_weights import LoraWeights, load_adapter
from engine.model_config import ModelConfig

__all__ = ["LoraError", "LoraRegistry", "UnknownLoraError", "parse_lora_specs", "split_spec"]


class LoraRegistry:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_resident: int):
        if max_resident < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_resident}")
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.max_resident = max_resident
        self._registered: dict[str, tuple[Path, str]] = {}  # name -> (folder, digest)
        # name -> weights, least recently acquired first.
        self.resident: OrderedDict[str, LoraWeights] = OrderedDict()
        self.num_loads = 0  # folder reads, at registration and on demand

    def digests(self) -> dict[str, str]:
        return {name: digest for name, (_, digest) in self._registered.items()}

    def digest(self, name: str) -> str:
        entry = self._registered.get(name)
        if entry is None:
            raise UnknownLoraError(name, self._registered)
        return entry[1]

    def register(self, name: str, path: str | Path, in_use: Set[str]) -> str:
        """Read and check the folder, keep it resident; returns its digest. Registering
        a name again with the same contents changes nothing; with other contents it
        replaces the adapter, unless unfinished sequences still use it."""
        check_name(name)
        weights = self._read(Path(path))
        old = self._registered.get(name)
        if old is not None and old[1] != weights.digest and name in in_use:
            raise InvalidRequestError("lora", f"adapter {name!r} is in use by unfinished "
                                              f"requests; load the new folder once they end")
        self._registered[name] = (Path(path), weights.digest)
        self.resident[name] = weights
        self.resident.move_to_end(name)
        self._evict(in_use | {name})
        return weights.digest

    def unregister(self, name: str, in_use: Set[str]) -> None:
        """Forget an adapter; refused while unfinished sequences use it (they would lose
        their weights mid-generation)."""
        self.digest(name)  # raises UnknownLoraError
        if name in in_use:
            raise InvalidRequestError("lora", f"adapter {name!r} is in use by unfinished "
                                              f"requests; unload it once they end")
        del self._registered[name]
        self.resident.pop(name, None)

    def acquire(self, name: str, in_use: Set[str]) -> LoraWeights:
        """The adapter's weights, resident from now until evicted (never while a sequence
        in `in_use` names it): read again from its folder if they were evicted."""
        digest = self.digest(name)
        weights = self.resident.get(name)
        if weights is None:
            path = self._registered[name][0]
            weights = self._read(path)
            if weights.digest != digest:
                raise LoraError(f"{path}: changed on disk since adapter {name!r} was "
                                f"loaded; load it again to serve the new weights")
            self.resident[name] = weights
        self.resident.move_to_end(name)
        self._evict(in_use | {name})
        return weights

    def _read(self, path: Path) -> LoraWeights:
        self.num_loads += 1
        return load_adapter(path, self.cfg, self.dtype, self.device)

    def _evict(self, keep: Set[str]) -> None:
        for name in list(self.resident):
            if len(self.resident) <= self.max_resident:
                return
            if name not in keep:
                del self.resident[name]
