"""Where a prompt goes: pure functions of the prompt's blocks and a snapshot of the
workers (what each one's last Health said, plus what this gateway sent it since), with
no I/O, so that the rule can be read and tested on its own (tests/unit/test_placement.py).

- decode: the highest `cached prompt tokens - LOAD_TOKENS_PER_SEQUENCE x sequences`
  (running, waiting and sent since the last report), then the most free KV blocks, then
  the fewest requests in flight from this gateway: a cached prefix saves its KV transfer
  or local prefill, a busier batch slows every token;
- prefill: the fewest prompt tokens to compute before this one's first token (queued
  tokens plus this prompt's tokens the worker lacks), then the fewest in flight;
- remote prefill: when the part of the prompt the chosen decode worker lacks is at least
  `local_prefill_max_tokens` long and a prefill worker that has not failed this request
  is healthy; otherwise the decode worker prefills it (colocated): slower, but served.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# A sequence already in a decode worker's batch weighs as much as this many prompt tokens
# it would not have to receive or compute: a heuristic, about one prefill chunk of a
# short prompt on a CPU for one more row in every decode step.
LOAD_TOKENS_PER_SEQUENCE = 32


class Candidate(Protocol):
    """What placement reads of a worker (server.pool.Worker)."""

    address: str
    inflight: int

    def free_blocks(self) -> int: ...
    def queued_tokens(self) -> int: ...
    def sequences(self) -> int: ...


class Prompt(Protocol):
    """What placement reads of a prompt (server.prefix_index.PromptBlocks)."""

    prompt: list[int]

    def matched_tokens(self, worker) -> int: ...


@dataclass(frozen=True)
class Placement:
    worker: Candidate
    score: tuple  # the key it won on: larger wins for decode, smaller for prefill


def _cached(worker: Candidate, prompt: Prompt | None) -> int:
    return prompt.matched_tokens(worker) if prompt is not None else 0


def decode_score(worker: Candidate, prompt: Prompt | None) -> tuple:
    return (_cached(worker, prompt) - LOAD_TOKENS_PER_SEQUENCE * worker.sequences(),
            worker.free_blocks(), -worker.inflight)


def prefill_score(worker: Candidate, prompt: Prompt | None) -> tuple:
    uncached = len(prompt.prompt) - _cached(worker, prompt) if prompt is not None else 0
    return worker.queued_tokens() + uncached, worker.inflight


def best_decode(candidates: Sequence[Candidate], prompt: Prompt | None) -> Placement:
    worker = max(candidates, key=lambda w: decode_score(w, prompt))
    return Placement(worker, decode_score(worker, prompt))


def best_prefill(candidates: Sequence[Candidate], prompt: Prompt | None) -> Placement:
    worker = min(candidates, key=lambda w: prefill_score(w, prompt))
    return Placement(worker, prefill_score(worker, prompt))


def prefill_remotely(uncached_tokens: int, local_prefill_max_tokens: int,
                     prefill_candidates: Iterable[Candidate]) -> bool:
    """Whether a prompt with this many tokens the decode worker lacks goes to one of the
    healthy prefill workers that have not failed this request."""
    return uncached_tokens >= local_prefill_max_tokens and any(True for _ in prefill_candidates)
