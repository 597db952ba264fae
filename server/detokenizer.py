"""Token ids to text as they arrive, and stop strings that never leak.

Decoding one token alone loses context (leading spaces, characters split over several
byte-level tokens), and decoding the whole output each time is O(n) per token. The
usual fix: decode a short window twice, with and without the new tokens, and emit the
difference once it no longer ends in a half character (U+FFFD).
"""

from server.tokenizer import GatewayTokenizer

_CONTEXT = 5  # tokens decoded before the new ones, so spacing comes out as in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: GatewayTokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        seed = list(prompt_ids or [])[-_CONTEXT:]
        self.ids: list[int] = seed
        self.num_seed = len(seed)
        self.prefix_offset = 0        # window start
        self.read_offset = len(seed)  # first token whose text is not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        if not full.startswith(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character stays as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else ""


class StopChecker:
    """Text in, text safe to send out: the tail that could begin a stop string waits."""

    def __init__(self, stop: list[str] | None):
        self.stop = [s for s in (stop or []) if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buffer[:min(hits)], True
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held
