"""Pure decode steps on the CPU without pdserve's kernels, recorded once per batch size
and replayed from C++.

Where pdserve's kernels cannot run (x86 without AVX2, `--no-native-kernels`), a decode
step of a small model on a few rows is bound by dispatch, not arithmetic: the default
model runs about 900 small PyTorch ops in its 30 layers, each costing microseconds of
Python and dispatcher. `torch.jit.trace` records the step's ops once and TorchScript's
interpreter replays them without the Python: the same ops on the same tensors, so the
same bits (tests/unit/test_decode_graph.py). With pdserve's kernels a layer is a handful
of calls and a recorded step saves little (docs/performance.md), so none is recorded.

One graph per batch size, because the linear layers pick their kernel by row count
(engine.cpu_linear). Recording one takes a fraction of a second, so it never happens
where a request could wait for it: a decode worker records every size up to `max_rows`
before it serves (`record_all`), a prefill worker none. The graph takes the KV cache, the
slot tables and the padding mask as inputs, so the context length varies freely. Steps
with a prompt chunk, a LoRA adapter row, more than `max_rows` rows or a KV export run
eagerly, and so do batch sizes whose step cannot be recorded: oneDNN's prepacked GEMM
(bf16 layers that are not quantized, float32 from 4 rows) takes an argument the tracer
cannot hold.
torch.compile was tried first and was slower here (dynamo's guard checks cost about 60
us a layer; compiling the whole model copies the KV cache).
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
        self.max_rows = max_rows

    @property
    def recorded(self) -> list[int]:
        return sorted(self._graphs)

    def covers(self, meta: AttentionMetadata) -> bool:
        """Whether this step replays a graph (never one with LoRA rows: a recorded step
        has no per-row deltas)."""
        return not meta.prefills and meta.lora is None and meta.num_decode in self._graphs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, as LlamaModel.forward returns them."""
        return self._graphs[meta.num_decode](input_ids, positions, self._kv,
                                             meta.slot_mapping, meta.decode_slots,
                                             meta.decode_mask)

    def record_all(self) -> list[int]:
        """Every size up to max_rows that can be recorded; the sizes recorded."""
        for rows in range(1, self.max_rows + 1):
            if rows not in self._graphs and rows not in self._eager:
                self._record(rows)
        return self.recorded

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
