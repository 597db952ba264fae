"""Token ids to text as they arrive, and stop strings that never leak.

Decoding one token alone loses context (leading spaces, characters split over several
byte-level tokens), and decoding the whole output each time is O(n) per token. The
usual fix: decode a short window twice, with and without the new tokens, and emit the
difference once it no longer ends in a half character (U+FFFD).
"""

from server.tokenizer import GatewayTokenizer

# Prompt tokens decoded before the first output token, so that token's leading space
# (which some decoders strip at the start of a text) comes out as it does in context.
_CONTEXT = 5


class IncrementalDetokenizer:
    """push() one token id at a time; the pieces joined, plus flush(), equal decode(all).

    `ids[prefix_offset:read_offset]` is text already emitted, kept only as context;
    `ids[read_offset:]` is not emitted yet. Both decodes cover only that window, so each
    push costs O(1) however long the output grows.
    """

    def __init__(self, tokenizer: GatewayTokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])[-_CONTEXT:]
        self._prefix_text: str | None = self._decode(self.ids)  # emitted part; cached
        if self._prefix_text.endswith("\ufffd"):
            # A prompt given as token ids may end inside a character; the output's first
            # bytes would then complete it and decode differently from the output alone.
            self.ids, self._prefix_text = [], ""
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def _prefix(self) -> str:
        # The context part only changes when the offsets move, so decode it once per move.
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return self._prefix_text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._prefix()
        full = self._decode(self.ids[self.prefix_offset:])
        # Nothing new (a skipped special token) or a character still waiting for its
        # remaining bytes: keep the tokens and try again with the next one.
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        if not full.startswith(prefix):
            # The new tokens changed how the context decodes; wait until they settle
            # rather than emit text that would not match the whole decode.
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = None
        return full[len(prefix):]

    def flush(self) -> str:
        """Text of tokens still held back; a truly incomplete character stays U+FFFD,
        just as decoding the whole output shows it."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._prefix()
        full = self._decode(self.ids[self.prefix_offset:])
        if not full.startswith(prefix):
            # The context never settled (see push); the held tokens' own text is the
            # best answer and loses nothing.
            full, prefix = self._decode(self.ids[self.read_offset:]), ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = None
        return full[len(prefix):]


class StopChecker:
    """Text in, text safe to send out: the tail that could begin a stop string waits.

    Nothing from a stop string on is ever returned, even when the stop string arrives
    split over several feeds; after a stop every feed returns ("", True).
    """

    def __init__(self, stop: list[str] | None):
        self.stop = [s for s in (stop or []) if s]  # an empty stop would match at once
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self.held + text
        # The earliest match wins, whichever stop string it is, so nothing after any
        # stop string leaks out.
        hits = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buffer[:min(hits)], True
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop.

        The longest one matters: with stop "abc", the tail "ab" of "xab" must all wait,
        and holding only the longest tail also covers every shorter candidate in it.
        """
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Held-back text at the end of generation (none once a stop has matched)."""
        held, self.held = self.held, ""
        return "" if self.stopped else held
