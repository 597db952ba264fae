"""`pdserve bench`'s priority mix and Responses endpoint: the mix's syntax, classes drawn
by share without changing the prompts, TTFT reported by class, Responses events read
as the chunks the timing code takes, and the rag-quote workload's prompts and endpoint."""

import argparse

import pytest

from bench.cli import endpoint_of
from bench.client import _as_chunk
from bench.stats import RequestResult, summarize
from bench.workload import build_requests, parse_priority_mix


class WordTokenizer:
    def encode(self, text):
        return [hash(w) % 1000 for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_rag_quote_asks_to_repeat_a_passage_over_chat():
    requests = build_requests(WordTokenizer(), 5, workload="rag-quote", seed=1)
    instruction = "Repeat the following text exactly, word for word:\n\n"
    for request in requests:
        assert request.prompt.startswith(instruction)
        assert len(request.prompt.split()) > 150  # the passage itself
        assert request.prompt_tokens == len(WordTokenizer().encode(request.prompt))
        assert 64 <= request.max_tokens <= 128
    assert endpoint_of(argparse.Namespace(workload="rag-quote", endpoint=None)) == "chat"
    assert endpoint_of(argparse.Namespace(workload="chat", endpoint=None)) == "completions"
    assert endpoint_of(argparse.Namespace(workload="rag-quote",
                                          endpoint="completions")) == "completions"


def test_the_mix_parses_and_refuses_bad_shares():
    assert parse_priority_mix("0.2:0,0.8:10") == [(0.2, 0), (0.8, 10)]
    for bad in ("0.2:0", "0.5:x,0.5:1", "1.5:0", "0.5"):
        with pytest.raises(ValueError, match="--priority-mix"):
            parse_priority_mix(bad)


def test_classes_follow_the_shares_and_leave_the_prompts_alone():
    plain = build_requests(WordTokenizer(), 400, seed=3)
    mixed = build_requests(WordTokenizer(), 400, seed=3,
                           priority_mix=parse_priority_mix("0.2:0,0.8:10"))
    assert [r.prompt for r in plain] == [r.prompt for r in mixed]
    share = sum(r.priority == 0 for r in mixed) / len(mixed)
    assert 0.14 < share < 0.26 and {r.priority for r in mixed} == {0, 10}
    assert all(r.priority is None for r in plain)


def test_ttft_is_reported_by_priority():
    results = [RequestResult(True, 10, 4, ttft=t, latency=t + 1, priority=p)
               for p, t in [(0, 0.1), (0, 0.2), (10, 5.0), (10, 7.0)]]
    results.append(RequestResult(False, priority=10, error="HTTP 429"))
    report = summarize(results, 10.0)
    assert report["by_priority"]["0"]["completed"] == 2
    assert report["by_priority"]["10"]["failed"] == 1
    assert report["by_priority"]["0"]["ttft_s"]["p50"] == pytest.approx(0.15)
    assert "by_priority" not in summarize([RequestResult(True, 1, 1, 0.1, 0.2)], 1.0)


def test_responses_events_become_chunks():
    assert _as_chunk({"type": "response.output_text.delta", "delta": "Hi"}) == {
        "choices": [{"text": "Hi"}]}
    end = _as_chunk({"type": "response.completed", "response": {"usage": {
        "input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}}}})
    assert end["usage"]["completion_tokens"] == 3 and end["choices"] == []
    assert "error" in _as_chunk({"type": "response.failed", "response": {"error": {
        "message": "gone"}}})
    assert _as_chunk({"type": "response.created", "response": {}}) is None
