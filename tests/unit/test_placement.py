"""server.placement: where a prompt goes, as tables of worker snapshots and decisions."""

from dataclasses import dataclass

import pytest

from server.placement import (
    LOAD_TOKENS_PER_SEQUENCE,
    best_decode,
    best_prefill,
    decode_score,
    prefill_remotely,
)


@dataclass
class Snap:
    address: str
    free: int = 100
    queued: int = 0
    seqs: int = 0
    inflight: int = 0
    cached: int = 0  # prompt tokens this worker holds cached

    def free_blocks(self) -> int:
        return self.free

    def queued_tokens(self) -> int:
        return self.queued

    def sequences(self) -> int:
        return self.seqs


@dataclass
class Prompt:
    prompt: list[int]

    def matched_tokens(self, worker: Snap) -> int:
        return worker.cached


PROMPT = Prompt(list(range(200)))
L = LOAD_TOKENS_PER_SEQUENCE


@pytest.mark.parametrize("workers,winner,score", [
    # more free blocks wins when nothing is cached and batches are equal
    ([Snap("a", free=100), Snap("b", free=90)], "a", (0, 100, 0)),
    # a cached prefix beats free blocks
    ([Snap("a", free=100), Snap("b", free=10, cached=64)], "b", (64, 10, 0)),
    # ...unless the batch holding it is busier by more than the prefix is worth
    ([Snap("a", seqs=1), Snap("b", cached=64, seqs=4)], "a", (-L, 100, 0)),
    # a full tie goes to the fewest in flight from this gateway
    ([Snap("a", inflight=2), Snap("b", inflight=1)], "b", (0, 100, -1)),
])
def test_decode_placement(workers, winner, score):
    placement = best_decode(workers, PROMPT)
    assert (placement.worker.address, placement.score) == (winner, score)


@pytest.mark.parametrize("workers,winner,score", [
    # the fewest tokens to compute before this prompt's first token
    ([Snap("a", queued=500), Snap("b", queued=700)], "a", (700, 0)),
    # what a worker holds cached it does not compute
    ([Snap("a", queued=100), Snap("b", queued=150, cached=160)], "b", (190, 0)),
    ([Snap("a", inflight=3), Snap("b", inflight=1)], "b", (200, 1)),
])
def test_prefill_placement(workers, winner, score):
    placement = best_prefill(workers, PROMPT)
    assert (placement.worker.address, placement.score) == (winner, score)


def test_without_a_prompt_only_load_counts():
    assert decode_score(Snap("a", seqs=2, cached=999), None) == (-2 * L, 100, 0)
    assert best_prefill([Snap("a", queued=5), Snap("b", queued=3)], None).worker.address == "b"


@pytest.mark.parametrize("uncached,local_max,candidates,remote", [
    (100, 32, [Snap("p")], True),
    (32, 32, [Snap("p")], True),     # the limit itself goes remote
    (31, 32, [Snap("p")], False),    # shorter: the decode worker prefills it
    (100, 32, [], False),            # no prefill worker left for this request
])
def test_remote_prefill(uncached, local_max, candidates, remote):
    assert prefill_remotely(uncached, local_max, iter(candidates)) == remote
