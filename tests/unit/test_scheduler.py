"""Scheduling policy on its own: no model, exact token counts and block ids."""

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make(num_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=100))


def run_step(sched: Scheduler, sample_token: int = 7):
    """Apply a schedule as the engine would: mark tokens computed, sample at the end."""
    batch = sched.schedule()
    for item in batch:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_tokens
        if samples:
            item.seq.output_token_ids.append(sample_token)
    return [(item.seq.request_id, item.num_tokens) for item in batch]


def test_chunked_prefill_respects_the_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(make(40, "long"))
    assert run_step(sched) == [("long", 16)]
    assert run_step(sched) == [("long", 16)]
    assert run_step(sched) == [("long", 8)]   # last chunk samples the first token
    assert run_step(sched) == [("long", 1)]   # then it decodes


def test_new_sequences_join_a_running_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=32)
    sched.add(make(5, "a"))
    assert run_step(sched) == [("a", 5)]
    sched.add(make(6, "b"))
    assert run_step(sched) == [("a", 1), ("b", 6)]
    assert run_step(sched) == [("a", 1), ("b", 1)]


def test_decodes_are_served_before_new_prefill_and_share_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(make(3, "a"))
    run_step(sched)
    sched.add(make(20, "b"))
    assert run_step(sched) == [("a", 1), ("b", 9)]


def test_max_num_seqs_limits_the_running_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    for rid in "abc":
        sched.add(make(2, rid))
    assert run_step(sched) == [("a", 2), ("b", 2)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preempts_the_newest_sequence_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make(4, "a"), make(4, "b")
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("a", 4), ("b", 4)]   # all 4 blocks used
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    # a needs a third block for its 5th token: b (newest) is preempted and recomputed
    assert run_step(sched) == [("a", 1)]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and a.block_table == [0, 1, 2]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    bm.check()


def test_preempted_sequence_recomputes_prompt_and_output():
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make(4, "a"), make(5, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)            # a: 2 blocks, b: 3 blocks, 1 free
    run_step(sched)            # a takes the free block for its 5th token
    assert bm.num_free_blocks == 0
    assert run_step(sched) == [("a", 1)]  # b's 7th token needs a 4th block: b preempted
    assert b.status == SequenceStatus.WAITING and b.output_token_ids == [7, 7]
    sched.remove(a)            # a finishes
    assert run_step(sched) == [("b", 7)]  # its 5 prompt tokens and 2 outputs again
    assert b.num_computed_tokens == 7 and b.num_tokens == 8


def test_a_lone_sequence_that_cannot_grow_preempts_itself_without_crashing():
    bm = BlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seq = make(4, "a")
    sched.add(seq)
    run_step(sched)
    assert run_step(sched) == []      # needs a 3rd block that does not exist
    assert seq.status == SequenceStatus.WAITING and bm.num_free_blocks == 2


def test_waiting_queue_is_first_come_first_served():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make(12, "big"))
    sched.add(make(2, "small"))
    sched.add(make(12, "big2"))
    assert run_step(sched) == [("big", 12)]
    assert [s.request_id for s in sched.waiting] == ["small", "big2"]


def test_remove_frees_blocks_in_every_state():
    bm = BlockManager(num_blocks=8, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    running, waiting = make(6, "run"), make(2, "wait")
    sched.add(running)
    sched.add(waiting)
    run_step(sched)   # "run" is mid-prefill, "wait" still queued
    sched.remove(running)
    sched.remove(waiting)
    assert bm.num_free_blocks == 8 and not sched.has_work
    bm.check()
