"""N-gram (prompt-lookup) speculative decoding: which tokens to propose, and when.

Who calls what:
- the scheduler asks `Drafter.step_allowance(running)` once per step, then
  `Drafter.propose(seq, limit)` for each decoding sequence; a non-empty draft is scheduled
  with the sequence's last token as 1 + len(draft) tokens of one model step;
- the engine verifies the draft against that step's logits (LLMEngine._verify)
  and reports `Drafter.record(seq, drafted, accepted)`.

Drafting costs no model: the sequence's own tokens (prompt + output) are searched for
the most recent earlier occurrence of its last n tokens (n = MAX_NGRAM down to
MIN_NGRAM), and the tokens that followed it are proposed. An index per sequence, grown by
the tokens added since the last look, makes a lookup O(1) whatever the prompt's length.

A draft is cheap but not free: verifying 1 + k tokens adds k decode rows to the step,
each a few percent of a one-row step. So a draft is as long as the sequence's drafts
have earned: k times an exponential moving average of their acceptance (at least one
token). A sequence whose drafts keep failing (text that does not repeat) stops drafting
(the average below OFF_BELOW) and tries one token again RETRY_AFTER_TOKENS tokens later,
twice as late after each retry that fails. And a step that is already compute-bound
(many sequences) gains nothing from more rows: the tokens drafted in one step are
bounded by `step_allowance`, which falls to 0 for large batches.
"""

from dataclasses import dataclass, field

from engine.sequence import Sequence

MAX_NGRAM = 3
MIN_NGRAM = 1
# Acceptance EMA: weight of the newest draft, where a sequence starts, and the level
# below which it stops drafting: a first draft is k / 2 tokens, and one wholly rejected
# draft from the start turns drafting off.
EMA_WEIGHT = 0.5
EMA_START = 0.5
OFF_BELOW = 0.3
# Output tokens after which a sequence that stopped drafting tries once more (its EMA
# then starts just above OFF_BELOW, so that one more failure turns it off again, and
# the next wait is twice as long).
RETRY_AFTER_TOKENS = 32
# Most tokens drafted in one step, by the number of running sequences: beyond that many
# sequences a step's GEMMs are compute-bound on a CPU and extra rows cost their full
# price (docs/performance.md, Speculative decoding).
DRAFT_TOKENS_PER_STEP = 16
MAX_DRAFTING_SEQUENCES = 4


class NgramIndex:
    """A sequence's tokens and, for each n, where each n-gram last ended with a token
    after it: the lookup table of prompt-lookup decoding, grown incrementally."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.tokens: list[int] = []
        # n -> {n-gram: end}: tokens[end - n:end] is the n-gram, tokens[end] followed it.
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self._indexed = 1  # ends below this are in the tables

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        # Every end that now has a follower (all but the last token's end).
        for end in range(self._indexed, len(self.tokens)):
            for n in self.sizes:
                if end >= n:
                    self._last_end[n][tuple(self.tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(self.tokens))

    def propose(self, k: int) -> list[int]:
        """`k` tokens that followed the most recent earlier occurrence of the longest
        suffix (of MAX_NGRAM..MIN_NGRAM tokens) seen before; [] when none was. Where
        that occurrence is so recent that fewer than `k` tokens follow it, the text is
        taken to go on repeating with that period (a loop, a run of one token)."""
        tokens = self.tokens
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            end = self._last_end[n].get(tuple(tokens[-n:]))
            if end is not None:
                draft = tokens[end:end + k]
                period = len(tokens) - end
                while len(draft) < k:
                    draft.append(draft[len(draft) - period])
                return draft
        return []


@dataclass
class SpeculationState:
    """One sequence's drafting: its index and how well its drafts have done."""

    index: NgramIndex = field(default_factory=NgramIndex)
    acceptance: float = EMA_START
    retry_at: int | None = None  # output count at which an off sequence tries again
    retry_after: int = RETRY_AFTER_TOKENS  # the next wait, doubled by each failed retry

    def sync(self, seq: Sequence) -> None:
        """Add the tokens `seq` gained since the last look (outputs only ever grow)."""
        have = len(self.index.tokens)
        if have < seq.num_prompt_tokens:
            self.index.extend(seq.prompt_token_ids[have:])
            have = seq.num_prompt_tokens
        if have < seq.num_tokens:
            self.index.extend(seq.output_token_ids[have - seq.num_prompt_tokens:])

    def enabled(self, num_output_tokens: int) -> bool:
        if self.retry_at is None:
            return True
        if num_output_tokens < self.retry_at:
            return False
        self.retry_at, self.acceptance = None, OFF_BELOW + 1e-3
        return True

    def length(self, k: int) -> int:
        """The draft this sequence has earned: k scaled by its acceptance, at least 1."""
        return max(1, min(k, round(k * self.acceptance)))

    def record(self, drafted: int, accepted: int, num_output_tokens: int) -> None:
        rate = accepted / drafted
        self.acceptance = (1 - EMA_WEIGHT) * self.acceptance + EMA_WEIGHT * rate
        if self.acceptance < OFF_BELOW:
            self.retry_at = num_output_tokens + self.retry_after
            self.retry_after *= 2
        elif accepted:
            self.retry_after = RETRY_AFTER_TOKENS


class Drafter:
    """The engine's n-gram drafting policy and its counters (what the worker exports)."""

    def __init__(self, num_speculative_tokens: int, max_seq_len: int,
                 tokens_per_step: int = DRAFT_TOKENS_PER_STEP,
                 max_sequences: int = MAX_DRAFTING_SEQUENCES):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.k = num_speculative_tokens
        self.max_seq_len = max_seq_len
        self.tokens_per_step = tokens_per_step
        self.max_sequences = max_sequences
        self.num_drafts = 0
        self.num_drafted_tokens = 0
        self.num_accepted_tokens = 0

    def step_allowance(self, num_running: int) -> int:
        """Tokens this step may draft in all, given the running batch's size."""
        return self.tokens_per_step if num_running <= self.max_sequences else 0

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """At most `limit` tokens to verify after `seq`'s last one ([] for none). Only
        for a decoding sequence: one token left to compute, whose last token it is."""
        if seq.prefill_only or seq.export_kv or limit < 1:
            return []
        if seq.params.grammar is not None and seq.matcher is None:
            return []
        # Tokens worth drafting: the step emits at most len(draft) + 1, and a position
        # past max_seq_len has no room.
        limit = min(limit, self.k, seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_seq_len - seq.num_tokens)
        if limit < 1:
            return []
        state = seq.speculation
        if state is None:
            state = seq.speculation = SpeculationState()
        if not state.enabled(seq.num_output_tokens):
            return []
        state.sync(seq)
        draft = state.index.propose(min(limit, state.length(self.k)))
        if draft and seq.matcher is not None:
            # A token the grammar refuses can never be accepted: do not spend a row on it.
            draft = draft[:seq.matcher.valid_prefix(draft)]
        return draft

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_drafted_tokens += drafted
        self.num_accepted_tokens += accepted
        if seq.speculation is not None:
            seq.speculation.record(drafted, accepted, seq.num_output_tokens)
