"""One generated sample's state: its tokens, progress and KV block table."""

import enum
import itertools
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from pdserve_proto.prefix import adapter_namespace, block_hash


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued for (re)computation of its tokens
    RUNNING = "running"      # in the running batch: prefilling or decoding
    RESERVED = "reserved"    # blocks held for KV that another process will send
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"            # EOS or a stop token id
    LENGTH = "length"        # max_tokens, model context or KV capacity reached
    ABORT = "abort"          # cancelled by the caller
    ERROR = "error"          # failed inside the engine
    PREFILLED = "prefilled"  # prefill-only: first token sampled, KV exported


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


_seq_ids = itertools.count()


class Sequence:
    """A prompt plus the tokens generated so far.

    `num_computed_tokens` counts tokens whose KV is in the cache. Each step computes
    `tokens[num_computed_tokens : num_computed_tokens + chunk]`; when that reaches the
    end of `tokens`, the step samples a new token. Prefill, chunked prefill, decode and
    recomputation after preemption are all this one rule.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 sample_index: int = 0):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.sample_index = sample_index
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        # (effective priority, arrival) set by the scheduler; lower goes first.
        self.rank: tuple[float, int] = (params.priority, self.seq_id)
        self.export_kv = False     # hand each layer's KV to the engine's export hook
        # The LoRA adapter it runs under (None: the base model) and that adapter's digest,
        # which keeps its KV blocks' names apart (pdserve_proto.prefix.adapter_namespace).
        self.lora: str | None = None
        self.lora_digest: str | None = None
        self.prefill_only = False  # finish once the first token is sampled
        # Prompt tokens whose KV came from the prefix cache when the sequence was first
        # admitted (usage reports them), and how many of its blocks the block manager
        # has named (engine.block_manager).
        self.num_cached_tokens = 0
        self.num_named_blocks = 0
        # Position -> logprob of the prompt token there (params.prompt_logprobs).
        self.prompt_logprobs: dict[int, TokenLogprob] = {}
        # Where the output stands in params.grammar (engine.grammar.Matcher), made when
        # the sequence first samples.
        self.matcher = None
        # Its n-gram drafting state (engine.speculative.SpeculationState), made when it
        # first decodes with speculation on.
        self.speculation = None
        self._block_names: list[bytes] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        return [self.token_id_at(i) for i in range(start, end)]

    def block_names(self, block_size: int, namespace: bytes, count: int) -> list[bytes]:
        """Names of the first `count` full blocks of this sequence's tokens (at most as
        many as it has full blocks), computed once each: tokens never change. `namespace`
        is the engine's; a sequence under a LoRA adapter names its blocks in that
        adapter's own namespace inside it."""
        count = min(count, self.num_tokens // block_size)
        if self.lora_digest:
            namespace = adapter_namespace(namespace, self.lora_digest)
        names = self._block_names
        while len(names) < count:
            start = len(names) * block_size
            names.append(block_hash(names[-1] if names else b"",
                                    self.token_ids(start, start + block_size), namespace))
        return names[:count]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
