"""Block accounting for the paged KV cache: which blocks each sequence owns."""

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """Hands out fixed-size KV blocks and takes them back.

    Invariant, checked by `check()`: every block is either free or owned by exactly one
    sequence, so `num_free_blocks + num_used_blocks == num_blocks` at all times. Blocks
    are handed out lowest id first and returned to the back of the free queue, which
    keeps allocation deterministic (tests assert exact ids).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}  # block id -> seq_id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owner)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks: {seq!r} needs {missing}, "
                               f"{len(self._free)} free")
        for _ in range(missing):
            block_id = self._free.popleft()
            self._owner[block_id] = seq.seq_id
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks; safe to call twice."""
        for block_id in seq.block_table:
            if self._owner.pop(block_id, None) != seq.seq_id:
                raise RuntimeError(f"block {block_id} is not owned by {seq!r}")
            self._free.append(block_id)
        seq.block_table = []

    def check(self) -> None:
        """Raise if the accounting invariant is broken (used in tests and debug)."""
        free = set(self._free)
        if len(free) != len(self._free) or free & self._owner.keys():
            raise AssertionError("a KV block is both free and owned, or free twice")
        if len(free) + len(self._owner) != self.num_blocks:
            raise AssertionError(f"{len(free)} free + {len(self._owner)} used != "
                                 f"{self.num_blocks} blocks")
