"""Requests to send: prompts of real language with exact token counts, and output lengths.

Prompts are windows of the bundled public-domain corpus (bench/data/corpus.txt) at
seeded offsets, made exact for the target model's tokenizer: the window's text is
re-encoded and trimmed or extended until it encodes to exactly the asked length.
Output lengths are enforced with `max_tokens` plus `ignore_eos`.
"""

import random
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


@dataclass(frozen=True)
class Lengths:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "Lengths":
        """'128' (fixed) or '32:256' (uniform, inclusive)."""
        low, _, high = text.partition(":")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"length {text!r}: expected N or LOW:HIGH") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"length {text!r}: need 1 <= LOW <= HIGH")
        return cls(lo, hi)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


# Named mixes: (weight, prompt lengths, output lengths). Sized so that a 2-core CPU
# running the default model (about 200 prompt tokens/s and 13 output tokens/s per
# core) finishes a sweep in minutes; scale with --input-len/--output-len elsewhere.
MIXES: dict[str, list[tuple[float, Lengths, Lengths]]] = {
    # Short prompts, medium outputs: decode-heavy.
    "chat": [(1.0, Lengths(32, 128), Lengths(32, 64))],
    # Long prompts, short outputs: prefill-heavy.
    "rag": [(1.0, Lengths(256, 512), Lengths(8, 24))],
    # Both at once: long prefills land in the middle of other requests' decoding.
    "mixed": [(0.5, Lengths(32, 128), Lengths(32, 64)),
              (0.5, Lengths(256, 512), Lengths(8, 24))],
    # A passage and the request to repeat it word for word (QUOTE_INSTRUCTION): the
    # answer copies its prompt, as RAG answers, code edits and summaries partly do;
    # what n-gram speculative decoding is for. Sent as chat (`pdserve bench` picks the
    # chat endpoint for it), where the default model does copy.
    "rag-quote": [(1.0, Lengths(192, 384), Lengths(64, 128))],
}
# Workloads whose prompt is an instruction around a corpus passage: name -> its format.
QUOTE_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n{passage}"
INSTRUCTIONS = {"rag-quote": QUOTE_INSTRUCTION}
# The endpoint a workload goes to unless --endpoint says otherwise.
DEFAULT_ENDPOINTS = {"rag-quote": "chat"}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    priority: int | None = None  # its class in a --priority-mix; None: no priority field


def parse_priority_mix(text: str) -> list[tuple[float, int]]:
    """'0.2:0,0.8:10': (share, priority) pairs, shares summing to 1."""
    mix = []
    for part in text.split(","):
        share, sep, priority = part.partition(":")
        try:
            mix.append((float(share), int(priority)))
        except ValueError:
            raise ValueError(f"--priority-mix {text!r}: expected SHARE:PRIORITY,...") from None
        if not sep or not 0 < mix[-1][0] <= 1:
            raise ValueError(f"--priority-mix {text!r}: each share is in (0, 1]")
    if abs(sum(share for share, _ in mix) - 1) > 1e-6:
        raise ValueError(f"--priority-mix {text!r}: the shares must sum to 1")
    return mix


class PromptMaker:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = tokenizer.encode(CORPUS.read_text())

    def make(self, length: int, offset: int) -> tuple[str, int]:
        """Text that encodes to exactly `length` tokens (or the closest found)."""
        ids = [self.ids[(offset + i) % len(self.ids)] for i in range(length)]
        extra = offset + length
        best = None
        for _ in range(8):
            text = self.tok.decode(ids)
            n = len(self.tok.encode(text))
            if n == length:
                return text, n
            if best is None or abs(n - length) < abs(best[1] - length):
                best = (text, n)
            if n > length:
                ids = self.tok.encode(text)[:length]
            else:
                ids = self.tok.encode(text) + \
                    [self.ids[(extra + i) % len(self.ids)] for i in range(length - n)]
                extra += length - n
        return best


def build_requests(tokenizer, num: int, *, workload: str | None = None,
                   input_len: Lengths | None = None, output_len: Lengths | None = None,
                   seed: int = 0,
                   priority_mix: list[tuple[float, int]] | None = None) -> list[BenchRequest]:
    """`num` requests from a named mix, or from explicit length ranges; with a priority
    mix, each in a priority class drawn by share (the prompts stay the same: the classes
    come from a generator of their own)."""
    if workload is not None:
        if workload not in MIXES:
            raise ValueError(f"workload {workload!r}: choose from {', '.join(MIXES)}")
        mix = MIXES[workload]
    else:
        mix = [(1.0, input_len or Lengths(128, 128), output_len or Lengths(64, 64))]
    rng = random.Random(seed)
    maker = PromptMaker(tokenizer)
    weights = [w for w, _, _ in mix]
    classes = random.Random(seed + 1)
    requests = []
    instruction = INSTRUCTIONS.get(workload, "{passage}")
    for _ in range(num):
        _, prompt_len, out_len = rng.choices(mix, weights)[0]
        text, n = maker.make(prompt_len.draw(rng), rng.randrange(len(maker.ids)))
        if instruction != "{passage}":
            text = instruction.format(passage=text.strip())
            n = len(tokenizer.encode(text))
        priority = None
        if priority_mix:
            priority = classes.choices([p for _, p in priority_mix],
                                       [w for w, _ in priority_mix])[0]
        requests.append(BenchRequest(text, n, out_len.draw(rng), priority))
    return requests


# Multi-turn chat: every conversation starts with the same system prompt; each turn adds
# a user message to the history, and the answer to it before the next one.
MULTITURN = {"system": Lengths(256, 256), "user": Lengths(32, 96), "output": Lengths(32, 64)}


@dataclass(frozen=True)
class Conversation:
    system: str
    users: tuple[str, ...]
    max_tokens: tuple[int, ...]


def build_conversations(tokenizer, num: int, *, turns: int = 4,
                        seed: int = 0) -> list[Conversation]:
    """`num` conversations of `turns` turns sharing one system prompt."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    rng = random.Random(seed)
    maker = PromptMaker(tokenizer)
    system, _ = maker.make(MULTITURN["system"].draw(rng), 0)
    conversations = []
    for _ in range(num):
        users = tuple(maker.make(MULTITURN["user"].draw(rng), rng.randrange(len(maker.ids)))[0]
                      for _ in range(turns))
        outputs = tuple(MULTITURN["output"].draw(rng) for _ in range(turns))
        conversations.append(Conversation(system, users, outputs))
    return conversations
