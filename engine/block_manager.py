"""Block accounting for the paged KV cache: which blocks each sequence owns, and which
full blocks an earlier sequence left behind for a later one with the same prefix.

Every block is in exactly one state, so `free + idle + in use == num_blocks` always
(checked by `check()`):
- free: nothing anyone will reuse;
- idle: a full block of a finished or preempted sequence, named in the prefix cache
  (engine.sequence names blocks, pdserve_proto.prefix says how) and owned by nobody.
  A later sequence whose prefix has that name takes it as it is; when a block is
  needed and none is free, the least recently released idle block is evicted;
- in use: owned by one or more sequences. Only full, named blocks are shared, and
  nobody writes a full block again, so a shared block is never changed under anyone.
Blocks are handed out lowest id first and come back to the back of their queue, which
keeps allocation deterministic (tests assert exact ids). Without a namespace (prefix
caching off) nothing is named and no block is ever idle.
"""

from collections import OrderedDict, deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, namespace: bytes | None = None):
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.namespace = namespace  # None: prefix caching off
        self._free: deque[int] = deque(range(num_blocks))
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._owners: dict[int, set[int]] = {}  # block id -> seq_ids
        self._name_of: dict[int, bytes] = {}   # block id -> name, for named blocks
        self._block_of: dict[bytes, int] = {}  # name -> block id
        self.num_evictions = 0
        # Prompt tokens looked up in the prefix cache at admission, and found there.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # Bumped whenever a name is added or forgotten: workers publish their names only
        # when this moved since the gateway's last look.
        self.version = 0

    # ----- counts -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free, and idle ones it would evict."""
        return len(self._free) + len(self._idle)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owners)

    @property
    def num_idle_blocks(self) -> int:
        return len(self._idle)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_names(self) -> list[bytes]:
        return list(self._block_of)

    # ----- allocation ---------------------------------------------------------------------

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether `seq` can cover `num_tokens` tokens, after taking the cached `prefix`
        blocks (as cached_prefix found them) when its table is still empty."""
        missing = max(0, self.blocks_for(num_tokens) - len(seq.block_table) - len(prefix))
        taken_from_idle = sum(1 for block in prefix if block in self._idle)
        return missing <= self.num_free_blocks - taken_from_idle

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` with fresh blocks to cover `num_tokens` tokens."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: {seq!r} needs {missing}, "
                               f"{self.num_free_blocks} free")
        for _ in range(missing):
            block_id = self._take()
            self._owners[block_id] = {seq.seq_id}
            seq.block_table.append(block_id)

    def _take(self, keep: set[int] = frozenset()) -> int | None:
        """A free block, else the least recently released idle block outside `keep`,
        evicted; None when there is neither."""
        if self._free:
            return self._free.popleft()
        block_id = next((b for b in self._idle if b not in keep), None)
        if block_id is None:
            return None
        del self._idle[block_id]
        self._forget(block_id)
        self.num_evictions += 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks; shared ones stay with their other owners,
        named ones wait idle for a later prefix. Safe to call twice."""
        released_named = []
        for block_id in seq.block_table:
            owners = self._owners.get(block_id)
            if owners is None or seq.seq_id not in owners:
                raise RuntimeError(f"block {block_id} is not owned by {seq!r}")
            owners.remove(seq.seq_id)
            if owners:
                continue
            del self._owners[block_id]
            if block_id in self._name_of:
                released_named.append(block_id)
            else:
                self._free.append(block_id)
        # The head of a sequence is the likeliest to be shared again (a system prompt):
        # release it last, so that it is evicted last.
        for block_id in reversed(released_named):
            self._idle[block_id] = None
        seq.block_table = []
        seq.num_named_blocks = 0

    def release_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks of `seq` past those holding its first `num_tokens`
        tokens: blocks only a rejected speculative draft wrote (never named or shared)."""
        keep = self.blocks_for(num_tokens)
        for block_id in seq.block_table[keep:]:
            if self._owners.get(block_id) != {seq.seq_id} or block_id in self._name_of:
                raise RuntimeError(f"block {block_id} of {seq!r} is shared or named")
            del self._owners[block_id]
            self._free.append(block_id)
        del seq.block_table[keep:]

    # ----- the prefix cache ---------------------------------------------------------------

    def cached_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Blocks holding the longest named prefix of `seq`'s tokens, at most `max_tokens`
        of them (callers leave at least the last prompt token to compute)."""
        if self.namespace is None:
            return []
        names = seq.block_names(self.block_size, self.namespace, max_tokens // self.block_size)
        blocks = []
        for name in names:
            block_id = self._block_of.get(name)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        if self.namespace is not None:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_hit

    def take_prefix(self, seq: Sequence, prefix: list[int]) -> int:
        """Give `seq` (with an empty table) the cached `prefix` blocks; returns how many
        tokens they hold."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already has blocks; a prefix comes first")
        for block_id in prefix:
            self._idle.pop(block_id, None)
            self._owners.setdefault(block_id, set()).add(seq.seq_id)
        seq.block_table = list(prefix)
        seq.num_named_blocks = len(prefix)
        return len(prefix) * self.block_size

    def name_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks `seq` has filled (its computed tokens) since the last call, so
        that later sequences can share them. A block whose contents another block already
        holds under that name stays unnamed (freed as usual)."""
        if self.namespace is None:
            return
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_named_blocks:
            return
        names = seq.block_names(self.block_size, self.namespace, full)
        for index in range(seq.num_named_blocks, full):
            block_id, name = seq.block_table[index], names[index]
            if block_id not in self._name_of and name not in self._block_of:
                self._name_of[block_id] = name
                self._block_of[name] = block_id
                self.version += 1
        seq.num_named_blocks = full

    def adopt(self, name: bytes, keep: set[int]) -> int | None:
        """A block to hold KV computed elsewhere (a decode worker's, pulled by a prefill
        worker), cached idle under `name` as if a finished sequence had left it. The
        caller fills it at once, before anything else runs on the engine. Evicts an
        idle block if none is free, but never one of `keep` (the prefix it extends);
        None when `name` is cached already or no block can be had."""
        if self.namespace is None or name in self._block_of:
            return None
        block_id = self._take(keep)
        if block_id is None:
            return None
        self._name_of[block_id] = name
        self._block_of[name] = block_id
        self._idle[block_id] = None
        self.version += 1
        return block_id

    def _forget(self, block_id: int) -> None:
        name = self._name_of.pop(block_id, None)
        if name is not None:
            del self._block_of[name]
            self.version += 1

    # ----- invariants ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the accounting invariant is broken (used in tests and debug)."""
        free, idle, used = set(self._free), set(self._idle), set(self._owners)
        if len(free) != len(self._free) or free & idle or free & used or idle & used:
            raise AssertionError("a KV block is in two states, or free twice")
        if len(free) + len(idle) + len(used) != self.num_blocks:
            raise AssertionError(f"{len(free)} free + {len(idle)} idle + {len(used)} used "
                                 f"!= {self.num_blocks} blocks")
        if any(not owners for owners in self._owners.values()):
            raise AssertionError("a block in use has no owner")
        if not idle <= self._name_of.keys() or free & self._name_of.keys():
            raise AssertionError("an idle block without a name, or a free one with one")
        if {b: n for n, b in self._block_of.items()} != self._name_of:
            raise AssertionError("the name index and the block names disagree")
