"""Grammar-constrained decoding: the next token may only be one the grammar allows.

llguidance does the matching: a dependency-free Rust wheel that turns a JSON schema,
regex or Lark grammar into a token mask in tens of microseconds and follows the tokens
a sequence samples. (xgrammar, the other maintained choice, pulls in triton on Linux, a
GPU compiler, even to run on the CPU.) Grammars are turned into llguidance's form once
per spec (pdserve_proto.grammars, cached), a matcher per sequence follows its tokens,
and the sampler masks the logits of constrained rows. An imported sequence's matcher
follows the first token the prefill worker sampled, so a decode worker continues (or
stops) exactly where that token left it, without anything new on the wire.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InvalidRequestError
from pdserve_proto.grammars import GrammarError, to_llguidance


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match (see pdserve_proto.grammars for the kinds)."""

    kind: str
    spec: str = ""


def compiled(grammar: Grammar) -> str:
    """llguidance's grammar for `grammar` (cached); InvalidRequestError naming what is
    wrong."""
    try:
        return to_llguidance(grammar.kind, grammar.spec)
    except GrammarError as exc:
        raise InvalidRequestError("grammar", str(exc)) from None


class GrammarTokenizer:
    """llguidance's view of the model's vocabulary, built once per engine."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        from llguidance import LLTokenizer

        self.vocab_size = vocab_size
        self.tokenizer = LLTokenizer(str(tokenizer_json), n_vocab=vocab_size,
                                     eos_token=list(eos_token_ids))

    def matcher(self, grammar: Grammar, output_token_ids: list[int]) -> "Matcher":
        return Matcher(self, compiled(grammar), output_token_ids)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar_text: str,
                 output_token_ids: list[int]):
        from llguidance import LLMatcher

        self.vocab_size = tokenizer.vocab_size
        self.matcher = LLMatcher(tokenizer.tokenizer, grammar_text)
        if output_token_ids and not self.matcher.consume_tokens(list(output_token_ids)):
            raise InvalidRequestError("grammar", "the tokens so far do not match the "
                                                 f"grammar: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor:
        """Boolean [vocab]: the tokens the grammar allows next (EOS when it is complete)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size]
                                .astype(bool))

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` the grammar accepts from here, without moving
        (speculative drafts are cut there)."""
        return self.matcher.validate_tokens(list(token_ids))

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more but EOS."""
        return self.matcher.is_stopped()
