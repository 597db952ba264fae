"""Pure decode steps on the CPU, recorded once per batch size and replayed from C++.

A decode step of a small model on a few rows is bound by dispatch, not arithmetic: the
default model runs about 900 small ops in its 30 layers, each costing microseconds of
Python and dispatcher. `torch.jit.trace` records the step's ops once and TorchScript's
interpreter replays them without the Python: the same ops on the same tensors, so the
same bits (tests/unit/test_decode_graph.py). On 2 cores the default model's one-row int4
forward took 9.1 ms replayed against 12.4 ms eager.

One graph per batch size, because the linear layers pick their kernel by row count
(engine.cpu_linear). Recording one takes 0.3-1 s, so it never happens inside a step: a
decode step whose size has no graph runs eagerly and asks for one, and `record_next()`
records it on a scratch KV cache of one block, which the workers call while the engine
is idle (worker.engine_loop). Only sizes that were used get recorded: a prefill worker,
which runs no decode steps, records none, and a worker start costs nothing (recording
all 16 sizes up front took 8-17 s of CPU a worker). The graph takes the KV cache, the
slot tables and the padding mask as inputs, so the context length varies freely. Steps
with a prompt chunk, more than `max_rows` rows or a KV export run eagerly, and so do
batch sizes whose step cannot be recorded: oneDNN's prepacked GEMM (bf16 layers that are
not quantized, float32 from 4 rows) takes an argument the tracer cannot hold. The
default model in bf16 with int4 weights is recorded at every size up to 16 rows, where
pdserve's VNNI kernels serve (up to 10 with PyTorch's int4 kernel). torch.compile was
tried first and was slower here (dynamo's guard checks cost about 60 us a layer;
compiling the whole model copies the KV cache).
"""

import logging
import warnings

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache
from engine.llama import LlamaModel

log = logging.getLogger("pdserve.engine")

# Larger decode batches spend most of a step in GEMMs; the dispatch saved is the same
# few milliseconds, and each size costs a recording.
DECODE_GRAPH_MAX_ROWS = 16


class _DecodeStep(nn.Module):
    """LlamaModel.forward for a batch of decode tokens, with the metadata as tensors."""

    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, kv, slot_mapping, decode_slots, decode_mask):
        meta = AttentionMetadata(slot_mapping, input_ids.shape[0], decode_slots,
                                 decode_mask, [])
        return self.model.run_layers(input_ids, positions,
                                     lambda index: (kv[0, index], kv[1, index]), meta)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache,
                 max_rows: int = DECODE_GRAPH_MAX_ROWS):
        self._step = _DecodeStep(model)
        self._kv = kv_cache.tensor
        self._graphs: dict[int, torch.jit.ScriptModule] = {}
        self._eager: set[int] = set()  # batch sizes whose step could not be recorded
        self._wanted: set[int] = set()  # sizes run eagerly so far, to record when idle
        self.max_rows = max_rows

    @property
    def recorded(self) -> list[int]:
        return sorted(self._graphs)

    def covers(self, meta: AttentionMetadata) -> bool:
        """Whether this step replays a graph; a decode step of a size without one asks
        for it to be recorded."""
        if meta.prefills:
            return False
        rows = meta.num_decode
        if rows in self._graphs:
            return True
        if rows <= self.max_rows and rows not in self._eager:
            self._wanted.add(rows)
        return False

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, as LlamaModel.forward returns them."""
        return self._graphs[meta.num_decode](input_ids, positions, self._kv,
                                             meta.slot_mapping, meta.decode_slots,
                                             meta.decode_mask)

    def record_next(self) -> bool:
        """Record the smallest size asked for; False when none is waiting."""
        if not self._wanted:
            return False
        rows = min(self._wanted)
        self._wanted.discard(rows)
        self._record(rows)
        return True

    def record_all(self) -> None:
        """Every size up to max_rows at once (benchmarks, tests)."""
        self._wanted.update(r for r in range(1, self.max_rows + 1)
                            if r not in self._graphs and r not in self._eager)
        while self.record_next():
            pass

    def _record(self, rows: int) -> None:
        # Scratch inputs: one block of KV (every row writes and reads slot 0), so the
        # recording touches no block of the real cache, which may hold cached prefixes.
        kv = self._kv
        scratch = kv.new_zeros(kv.shape[0], kv.shape[1], 1, *kv.shape[3:])
        ids = torch.zeros(rows, dtype=torch.long, device=kv.device)
        slots = torch.zeros(rows, 1, dtype=torch.long, device=kv.device)
        mask = torch.zeros(rows, 1, 1, 1, dtype=kv.dtype, device=kv.device)
        args = (ids, ids, scratch, ids, slots, mask)
        with warnings.catch_warnings(), torch.inference_mode():
            # Shapes read while tracing warn; the ones read here are the batch size,
            # fixed per graph, and the model's constants. torch.jit is deprecated in
            # favour of torch.compile, which is slower here (see above).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                self._graphs[rows] = torch.jit.trace(self._step, args, check_trace=False)
            except (RuntimeError, AttributeError) as error:
                log.debug("decode steps of %d rows run eagerly: %s", rows,
                          str(error).splitlines()[0] if str(error) else type(error).__name__)
                self._eager.add(rows)
