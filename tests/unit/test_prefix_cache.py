"""Prefix caching: exact block ids through sharing, idling and eviction; reference counts;
a fuzz of random add/finish/abort/preempt steps checking the accounting after every
one; and an engine that gives the same greedy tokens with and without the cache, also
under eviction pressure and preemption."""

import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from pdserve_proto import prefix
from tests.unit.conftest import tiny_engine

SPACE = prefix.namespace("digest", "float32", "none", 4)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def seq_of(tokens) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams())


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """As if the engine computed all of seq's tokens: blocks allocated and named."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.name_full_blocks(seq)
    return seq


def test_a_finished_sequences_full_blocks_wait_idle_and_serve_the_same_prefix():
    bm = BlockManager(num_blocks=6, block_size=4, namespace=SPACE)
    a = computed(bm, seq_of(range(1, 11)))        # 10 tokens: 2 full blocks + 2 tokens
    assert a.block_table == [0, 1, 2]
    bm.free(a)
    assert (bm.num_free_blocks, bm.num_idle_blocks, bm.num_used_blocks) == (6, 2, 0)
    bm.check()
    b = seq_of([*range(1, 9), 50, 51, 52])           # same first 8 tokens
    hit = bm.cached_prefix(b, b.num_tokens - 1)
    assert hit == [0, 1]
    assert bm.take_prefix(b, hit) == 8 and b.block_table == [0, 1]
    bm.allocate(b, b.num_tokens)
    assert b.block_table == [0, 1, 3]  # block 2 was partial, so free, not idle: 3 is next
    assert bm.num_idle_blocks == 0
    bm.check()


def test_shared_blocks_count_every_owner_and_outlive_each():
    bm = BlockManager(num_blocks=8, block_size=4, namespace=SPACE)
    a = computed(bm, seq_of(range(1, 13)))          # 3 full blocks
    b = seq_of([*range(1, 9), 7, 7, 7, 7, 7])
    bm.take_prefix(b, bm.cached_prefix(b, b.num_tokens - 1))
    bm.allocate(b, b.num_tokens)
    assert b.block_table[:2] == a.block_table[:2] == [0, 1]
    assert bm._owners[0] == {a.seq_id, b.seq_id} and bm._owners[2] == {a.seq_id}
    bm.free(a)                                      # b still holds 0 and 1
    assert bm.num_used_blocks == 4 and bm.num_idle_blocks == 1  # a's own block 2
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_idle_blocks == 3
    bm.check()


def test_eviction_takes_free_blocks_first_then_the_least_recently_released():
    bm = BlockManager(num_blocks=4, block_size=4, namespace=SPACE)
    a = computed(bm, seq_of(range(1, 9)))           # blocks 0, 1
    b = computed(bm, seq_of(range(100, 108)))       # blocks 2, 3
    bm.free(a)                                      # idle: 1, then 0 (head last)
    bm.free(b)                                      # idle: 1, 0, 3, 2
    assert list(bm._idle) == [1, 0, 3, 2]
    c = seq_of(range(200, 206))
    bm.allocate(c, 6)
    assert c.block_table == [1, 0] and bm.num_evictions == 2
    assert bm.cached_prefix(seq_of(range(1, 9)), 8) == []          # a's blocks: gone
    assert bm.cached_prefix(seq_of(range(100, 109)), 8) == [2, 3]  # b's: still there
    bm.check()


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=4, block_size=4, namespace=SPACE)
    bm.free(computed(bm, seq_of(range(1, 9))))
    same = seq_of(range(1, 9))                      # all 8 tokens cached...
    assert bm.cached_prefix(same, same.num_tokens - 1) == [0]  # ...but only 1 block used


def test_without_a_namespace_nothing_is_named_or_kept():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, seq_of(range(1, 9)))
    bm.free(a)
    assert bm.num_idle_blocks == 0 and bm.cached_prefix(seq_of(range(1, 9)), 8) == []
    assert list(bm._free) == [2, 3, 0, 1]


def test_other_namespaces_never_match():
    bm = BlockManager(num_blocks=4, block_size=4, namespace=SPACE)
    bm.free(computed(bm, seq_of(range(1, 9))))
    other = BlockManager(num_blocks=4, block_size=4,
                         namespace=prefix.namespace("digest", "bfloat16", "none", 4))
    assert prefix.block_hashes(list(range(1, 9)), 4, SPACE) != prefix.block_hashes(
        list(range(1, 9)), 4, other.namespace)


def test_adopted_blocks_wait_idle_under_their_names_and_extend_the_prefix():
    bm = BlockManager(num_blocks=5, block_size=4, namespace=SPACE)
    bm.free(computed(bm, seq_of(range(1, 9))))      # blocks 0 and 1 idle: tokens 1-8
    longer = seq_of(range(1, 18))                   # 4 full blocks, the first 2 cached
    names = longer.block_names(4, SPACE, 4)
    assert bm.adopt(names[0], keep=set()) is None   # cached already
    assert bm.adopt(names[2], keep={0, 1}) == 2     # a free block, lowest id first
    assert bm.adopt(names[3], keep={0, 1, 2}) == 3
    assert bm.cached_prefix(longer, longer.num_tokens - 1) == [0, 1, 2, 3]
    assert (bm.num_idle_blocks, bm.num_used_blocks) == (4, 0)
    bm.check()
    other = seq_of([9] * 16).block_names(4, SPACE, 4)
    assert bm.adopt(other[0], keep=set()) == 4      # the last free block
    # None free: the least recently released idle block outside `keep` is evicted.
    assert bm.adopt(other[1], keep={0, 1, 4}) == 2 and bm.num_evictions == 1
    assert bm.adopt(other[2], keep={0, 1, 2, 3, 4}) is None
    bm.check()
    assert BlockManager(4, 4, namespace=None).adopt(names[0], keep=set()) is None


def test_fuzz_accounting_holds_after_every_step():
    rng = random.Random(5)
    bm = BlockManager(num_blocks=24, block_size=4, namespace=SPACE)
    prompts = [[rng.randrange(1, 6) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    live: list[Sequence] = []
    for _ in range(3000):
        action = rng.random()
        if action < 0.1:                            # adopt KV computed elsewhere
            seq = seq_of(rng.choice(prompts) + [rng.randrange(1, 6)] * rng.randrange(8))
            held = bm.cached_prefix(seq, seq.num_tokens - 1)
            keep = set(held)
            for name in seq.block_names(4, SPACE, seq.num_tokens // 4)[len(held):]:
                block = bm.adopt(name, keep)
                if block is None:
                    break
                keep.add(block)
        elif action < 0.4:                          # add: a prompt, maybe extended
            seq = seq_of(rng.choice(prompts) + [rng.randrange(1, 6)] * rng.randrange(3))
            hit = bm.cached_prefix(seq, seq.num_tokens - 1)
            if bm.can_allocate(seq, seq.num_tokens, hit):
                seq.num_computed_tokens = bm.take_prefix(seq, hit)
                bm.allocate(seq, seq.num_tokens)
                live.append(seq)
        elif action < 0.7 and live:                 # compute one step, maybe grow
            seq = rng.choice(live)
            seq.num_computed_tokens = seq.num_tokens
            bm.name_full_blocks(seq)
            if bm.can_allocate(seq, seq.num_tokens + 1):
                seq.output_token_ids.append(rng.randrange(1, 6))
                bm.allocate(seq, seq.num_tokens)
        elif live:                                  # finish, abort or preempt: all free
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check()
        owners = {}
        for seq in live:
            for block in seq.block_table:
                owners.setdefault(block, set()).add(seq.seq_id)
        assert owners == bm._owners
    for seq in live:
        bm.free(seq)
    bm.check()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks


def prompts_sharing_a_prefix(count: int) -> list[list[int]]:
    rng = random.Random(11)
    system = [rng.randrange(3, 49152) for _ in range(37)]
    return [system + [rng.randrange(3, 49152) for _ in range(rng.randrange(1, 20))]
            for _ in range(count)]


@pytest.mark.parametrize("overrides", [
    {},
    {"kv_cache_tokens": 96, "max_num_batched_tokens": 16},  # eviction and preemption
])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(overrides):
    prompts = prompts_sharing_a_prefix(8)
    plain = tiny_engine(prefix_caching=False, **overrides)
    expected = [plain.generate([p], GREEDY)[0][0].output_token_ids for p in prompts]
    cached = tiny_engine(**overrides)
    one_by_one = [cached.generate([p], GREEDY)[0][0] for p in prompts]
    assert [s.output_token_ids for s in one_by_one] == expected
    assert [s.num_cached_tokens for s in one_by_one[1:]] == [36] * 7  # 9 blocks of 4
    together = cached.generate(prompts, GREEDY)
    assert [r[0].output_token_ids for r in together] == expected
    cached.blocks.check()
    assert cached.blocks.num_used_blocks == 0
    assert cached.blocks.num_hit_tokens > 0
    if overrides:
        assert cached.scheduler.num_preemptions > 0 and cached.blocks.num_evictions > 0


def test_kv_imported_from_another_engine_serves_as_its_own_would():
    """What a prefill worker does with the KV it pulls from a decode worker."""
    system = prompts_sharing_a_prefix(1)[0][:37]
    source = tiny_engine()
    answer = source.generate([system], GREEDY)[0][0].output_token_ids
    second = system + answer + [5, 6, 7, 8, 9]
    # The source's cache holds the first turn and its answer (all but the last token).
    probe = seq_of(second)
    probe.num_cached_tokens = source.blocks.take_prefix(
        probe, source.blocks.cached_prefix(probe, probe.num_tokens - 1))
    held = probe.num_cached_tokens
    assert held == (len(system) + len(answer) - 1) // 4 * 4
    layers = [source.read_kv(probe, layer, 8, held)
              for layer in range(source.model_config.num_layers)]
    source.blocks.free(probe)

    target = tiny_engine()
    target.generate([system[:9]], GREEDY)           # it holds the first 8 tokens only
    assert target.cached_prefix_tokens(second) == 8
    assert target.import_prefix(second, 8, layers) == held
    target.blocks.check()
    assert target.cached_prefix_tokens(second) == held
    got = target.generate([second], GREEDY)[0][0]
    assert got.num_cached_tokens == held
    plain = tiny_engine(prefix_caching=False).generate([second], GREEDY)[0][0]
    assert got.output_token_ids == plain.output_token_ids
    # KV that would not extend what is cached (it starts past it) is left out.
    fresh = tiny_engine()
    assert fresh.import_prefix(second, 8, layers) == 0 and fresh.blocks.num_idle_blocks == 0
    assert tiny_engine(prefix_caching=False).import_prefix(second, 0, layers) == 0
