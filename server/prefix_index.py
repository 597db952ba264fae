"""How much of a prompt a worker holds in its prefix cache, as far as the gateway knows.

Workers publish the names of their cached blocks in their Health reports (64 bits of
each, see pdserve_proto/prefix.py), and the pool keeps the latest set per worker. A
prompt's block names are computed once per namespace and block size asked for, and a
worker holds the prompt's longest run of leading names found in its set. The index can
be stale (a block evicted since the last report, a lost report): then the worker finds
less than the gateway thought, which costs speed, never correctness, since workers
match full names against their own caches.

A prompt run under a LoRA adapter has KV of its own: its blocks are named in the
adapter's namespace (pdserve_proto.prefix.adapter_namespace over the worker's namespace
and the adapter's digest from its Health), as the worker names them.
"""

from pdserve_proto.prefix import adapter_namespace, block_hashes, short


class PromptBlocks:
    """One prompt's block names, and the cached prefix each worker holds of it, under
    the LoRA adapter `lora` (None: the base model)."""

    def __init__(self, prompt: list[int], lora: str | None = None):
        self.prompt = prompt
        self.lora = lora
        self._names: dict[tuple[bytes, int], list[int]] = {}

    def matched_tokens(self, worker) -> int:
        """Leading prompt tokens `worker` holds cached, by its last report. Like the
        workers, it never counts the last token, which is always computed."""
        health = worker.health
        if health is None or not health.prefix_namespace or not worker.prefix_blocks:
            return 0
        space = health.prefix_namespace
        if self.lora is not None:
            digest = worker.loras.get(self.lora)
            if digest is None:
                return 0
            space = adapter_namespace(space, digest)
        key = (space, health.block_size)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = [short(name) for name in block_hashes(
                self.prompt[:-1], health.block_size, space)]
        held = 0
        for name in names:
            if name not in worker.prefix_blocks:
                break
            held += 1
        return held * health.block_size
