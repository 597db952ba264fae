"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy only; the scheduler never touches tensors. Sequences go in rank order: a
sequence's rank is its effective priority, `params.priority` (lower first) less the
seconds it has been in this scheduler divided by `priority_aging_seconds` (0: no aging),
then its arrival. As the wait counts the same for everyone, the rank is fixed when a
sequence arrives (priority + arrival / aging), and a low priority waits at most
`aging * (its priority - the best priority)` seconds longer than the best. With one
priority, rank order is arrival order.

Every step spends a token budget: running sequences first in rank order (a decode costs
one token, a prompt still being prefilled takes a chunk of what is left), then waiting
sequences in rank order. When a running sequence needs a block and none is free, the
worst-ranked running sequence (the lowest priority, the newest) is preempted: its blocks
are freed and it waits, at its rank, to be recomputed. A waiting sequence that outranks
running ones and cannot start (no blocks, or the batch is full) preempts them, worst
first. Nothing ever fails for lack of blocks. A sequence admitted with an empty block
table first takes the longest prefix of its tokens that the prefix cache holds, and
computes from the first token after it.
"""

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.speculative import Drafter


@dataclass
class ScheduledSeq:
    seq: Sequence
    # Tokens computed this step from seq.num_computed_tokens: its own, then the draft.
    num_tokens: int
    # Tokens proposed after the sequence's last one (engine.speculative), not yet its
    # own: the step computes them too, and the engine keeps those the model agrees with.
    draft: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence and so samples a token."""
        own = self.num_tokens - len(self.draft)
        return self.seq.num_computed_tokens + own == self.seq.num_tokens

    def token_ids(self) -> list[int]:
        """The tokens this step computes, draft included."""
        start = self.seq.num_computed_tokens
        own = self.seq.token_ids(start, start + self.num_tokens - len(self.draft))
        return own + list(self.draft) if self.draft else own


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, priority_aging_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, drafter: Drafter | None = None):
        self.blocks = block_manager
        self.drafter = drafter  # None: no speculative decoding
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging = priority_aging_seconds
        self.clock = clock
        self._epoch = clock()
        self.waiting: list[Sequence] = []  # best rank first
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self._arrive(seq)
        seq.status = SequenceStatus.WAITING
        self._wait(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (imported) to the batch."""
        self._arrive(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _arrive(self, seq: Sequence) -> None:
        rank = float(seq.params.priority)
        if self.aging > 0:  # see the module docstring: the wait cancels out of the order
            rank += (self.clock() - self._epoch) / self.aging
        seq.rank = (rank, seq.seq_id)

    def _wait(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_rank)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        self._make_room_for_waiting()
        preemptions_before = self.num_preemptions
        allowance = self.drafter.step_allowance(len(self.running)) if self.drafter else 0
        for seq in sorted(self.running, key=_rank):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            draft = ()
            if allowance and seq.num_uncomputed_tokens == 1:
                draft = self._draft(seq, min(allowance, budget - 1))
                allowance -= len(draft)
            if not self._make_room(seq, seq.num_computed_tokens + num_tokens + len(draft)):
                break
            batch.append(ScheduledSeq(seq, num_tokens + len(draft), draft))
            budget -= num_tokens + len(draft)
        if self.num_preemptions == preemptions_before:
            self._admit_waiting(batch, budget)  # never admit while evicting
        return batch

    def _draft(self, seq: Sequence, limit: int) -> tuple[int, ...]:
        """A draft for a decoding sequence, when its blocks fit without taking the last
        free ones: a draft never preempts anyone (one free block is left per running
        sequence)."""
        draft = self.drafter.propose(seq, limit)
        if not draft:
            return ()
        missing = self.blocks.num_missing_blocks(seq, seq.num_tokens + len(draft))
        if missing and self.blocks.num_free_blocks - missing < len(self.running):
            return ()
        return tuple(draft)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Allocate blocks for `seq`, preempting the newest sequences if needed.

        Returns False when `seq` itself had to be preempted.
        """
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = max(self.running, key=_rank)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def _make_room_for_waiting(self) -> None:
        """Preempt running sequences ranked below the best waiting one, worst first,
        while that one cannot start: no blocks for its first chunk, or a full batch."""
        if not self.waiting:
            return
        head = self.waiting[0]
        while self.running:
            victim = max(self.running, key=_rank)
            if victim.rank < head.rank or (len(self.running) < self.max_num_seqs
                                           and self._first_chunk_fits(head)):
                return
            self._preempt(victim)

    def _first_chunk_fits(self, seq: Sequence) -> bool:
        prefix = self._cached_prefix(seq)
        start = len(prefix) * self.blocks.block_size
        first = min(seq.num_tokens - start, self.max_num_batched_tokens)
        return self.blocks.can_allocate(seq, start + first, prefix)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for a sequence starting from scratch; its last token is always
        computed (it gives the logits to sample from)."""
        if seq.block_table or seq.num_computed_tokens or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every position computed
        return self.blocks.cached_prefix(seq, seq.num_tokens - 1)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._wait(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, batch: list[ScheduledSeq], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self._cached_prefix(seq)
            start = len(prefix) * self.blocks.block_size
            num_tokens = min(seq.num_tokens - start, budget)
            if not self.blocks.can_allocate(seq, start + num_tokens, prefix):
                break  # in rank order: do not let later ones overtake
            self.waiting.pop(0)
            if prefix:
                seq.num_computed_tokens = self.blocks.take_prefix(seq, prefix)
            if seq.num_preemptions == 0:  # first admission: what usage and metrics count
                seq.num_cached_tokens = start
                self.blocks.record_lookup(seq.num_prompt_tokens, start)
            self.blocks.allocate(seq, start + num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, num_tokens))
            budget -= num_tokens


def _rank(seq: Sequence) -> tuple[float, int]:
    return seq.rank
