"""Scheduling by priority on its own (engine.scheduler): lower priority values run first,
arrival order within one priority, preemption of the lowest-priority newest sequence
when blocks run out, a waiting high priority taking the place of running low ones, and
aging that bounds how long a low priority waits. Exact request ids and token counts."""

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from tests.unit.test_scheduler import run_step


def make(rid: str, num_prompt: int = 2, priority: int = 0) -> Sequence:
    return Sequence(rid, list(range(1, num_prompt + 1)),
                    SamplingParams(max_tokens=100, priority=priority))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waiting_sequences_start_by_priority_then_arrival():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=64)
    for rid, priority in [("batch-1", 10), ("batch-2", 10), ("chat-1", 0), ("batch-3", 10),
                          ("chat-2", 0), ("urgent", -5)]:
        sched.add(make(rid, priority=priority))
    assert run_step(sched) == [("urgent", 2), ("chat-1", 2), ("chat-2", 2)]
    assert [s.request_id for s in sched.waiting] == ["batch-1", "batch-2", "batch-3"]


def test_running_sequences_get_the_budget_in_priority_order():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(make("low", 8, priority=5))
    assert run_step(sched) == [("low", 8)]
    sched.add(make("high", 8, priority=1))
    sched.max_num_batched_tokens = 5  # the high one is admitted with what is left
    assert run_step(sched) == [("low", 1), ("high", 4)]
    assert run_step(sched) == [("high", 4), ("low", 1)]


def test_blocks_running_out_preempt_the_lowest_priority_newest_sequence():
    # 6 blocks of 2 tokens; three sequences of 4 prompt tokens (2 blocks each) fill them.
    sched = Scheduler(BlockManager(num_blocks=6, block_size=2), max_num_seqs=8,
                      max_num_batched_tokens=64)
    for rid, priority in [("p0-old", 0), ("p9-old", 9), ("p9-new", 9)]:
        sched.add(make(rid, 4, priority))
    assert run_step(sched) == [("p0-old", 4), ("p9-old", 4), ("p9-new", 4)]
    # Each needs a third block to decode its fifth token: p0-old goes first and takes
    # the blocks of p9-new (lowest priority, newest); p9-old gets the one left over.
    assert run_step(sched) == [("p0-old", 1), ("p9-old", 1)]
    assert [s.request_id for s in sched.waiting] == ["p9-new"]
    assert sched.num_preemptions == 1
    new = sched.waiting[0]
    assert (new.status, new.num_computed_tokens, new.block_table) == (
        SequenceStatus.WAITING, 0, [])


def test_a_waiting_high_priority_preempts_running_low_ones_when_the_batch_is_full():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    sched.add(make("low-a", priority=10))
    sched.add(make("low-b", priority=10))
    assert run_step(sched) == [("low-a", 2), ("low-b", 2)]
    sched.add(make("high", priority=0))
    # low-b is the lowest priority and the newest: it makes way; low-a keeps decoding.
    assert run_step(sched) == [("low-a", 1), ("high", 2)]
    assert [s.request_id for s in sched.waiting] == ["low-b"]
    sched.add(make("same", priority=10))  # equal to the running ones: it waits its turn
    assert run_step(sched) == [("high", 1), ("low-a", 1)]
    assert [s.request_id for s in sched.waiting] == ["low-b", "same"]


def test_a_waiting_high_priority_preempts_for_blocks():
    sched = Scheduler(BlockManager(num_blocks=4, block_size=2), max_num_seqs=8,
                      max_num_batched_tokens=64)
    sched.add(make("low", 6, priority=3))
    assert run_step(sched) == [("low", 6)]  # 3 of the 4 blocks
    sched.add(make("high", 4, priority=1))  # needs 2 blocks, 1 is free
    assert run_step(sched) == [("high", 4)]
    assert [s.request_id for s in sched.waiting] == ["low"]


def test_equal_priorities_never_preempt_for_a_waiting_sequence():
    sched = Scheduler(BlockManager(num_blocks=4, block_size=2), max_num_seqs=8,
                      max_num_batched_tokens=64)
    sched.add(make("first", 6))
    run_step(sched)
    sched.add(make("second", 4))
    assert run_step(sched) == [("first", 1)]
    assert [s.request_id for s in sched.waiting] == ["second"]


def test_aging_lets_an_old_low_priority_go_before_a_new_high_one():
    clock = Clock()
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64,
                      priority_aging_seconds=2.0, clock=clock)
    sched.add(make("running"))
    run_step(sched)
    sched.add(make("batch", priority=10))  # arrives at t=0
    clock.now = 19.0
    sched.add(make("chat-early", priority=0))  # 10 - 19/2 = 0.5 > 0: chat goes first
    clock.now = 21.0
    sched.add(make("chat-late", priority=0))  # batch has waited 21 s: 10 - 10.5 < 0
    assert [s.request_id for s in sched.waiting] == ["chat-early", "batch", "chat-late"]


def test_without_aging_a_low_priority_waits_behind_every_higher_one():
    clock = Clock()
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64,
                      priority_aging_seconds=0.0, clock=clock)
    sched.add(make("batch", priority=10))
    clock.now = 10_000.0
    sched.add(make("chat", priority=0))
    assert [s.request_id for s in sched.waiting] == ["chat", "batch"]
