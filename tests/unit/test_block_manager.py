import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(num_tokens: int) -> Sequence:
    return Sequence("r", list(range(1, num_tokens + 1)), SamplingParams())


def test_allocates_lowest_ids_first_and_exact_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(5), make_seq(4)
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    assert a.block_table == [0, 1]
    assert b.block_table == [2]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (5, 3)
    bm.check()


def test_append_grows_only_at_block_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(3)
    bm.allocate(seq, 3)
    bm.allocate(seq, 4)
    assert seq.block_table == [0]
    bm.allocate(seq, 5)
    assert seq.block_table == [0, 1]
    assert bm.num_missing_blocks(seq, 9) == 1


def test_free_returns_blocks_to_the_back_of_the_queue():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(4), make_seq(2)
    bm.allocate(a, 4)
    bm.allocate(b, 2)
    bm.free(a)
    assert a.block_table == []
    c = make_seq(4)
    bm.allocate(c, 4)
    assert c.block_table == [3, 0]  # 3 was never used; 0, 1 came back after it
    bm.check()
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def test_free_twice_is_harmless():
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq(3)
    bm.allocate(seq, 3)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 2
    bm.check()


def test_can_allocate_and_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(9)
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_check_detects_broken_accounting():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(2)
    bm.allocate(seq, 2)
    bm._free.append(seq.block_table[0])  # corrupt on purpose
    with pytest.raises(AssertionError):
        bm.check()


def test_freeing_a_block_owned_by_another_sequence_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = make_seq(2), make_seq(2)
    bm.allocate(a, 2)
    b.block_table = list(a.block_table)
    with pytest.raises(RuntimeError, match="not owned"):
        bm.free(b)


def test_slots_for_positions_and_contiguous_runs():
    from engine.kv_cache import contiguous_slots, slots_for_positions

    table = [5, 6, 2, 3]
    assert slots_for_positions(table, 0, 0, 4) == []
    assert slots_for_positions(table, 2, 7, 4) == [22, 23, 24, 25, 26]
    assert slots_for_positions(table, 3, 13, 4) == [23, 24, 25, 26, 27, 8, 9, 10, 11, 12]
    assert slots_for_positions(table, 15, 16, 4) == [15]
    assert contiguous_slots(table, 2, 7, 4) == 22
    assert contiguous_slots(table, 9, 16, 4) == 9
    assert contiguous_slots(table, 3, 13, 4) is None
