"""Text in, streamed text out: the engine behind a simple generation call."""

from collections.abc import Iterator

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.loader import load_tokenizer
from engine.sampling_params import SamplingParams


def stream_text(config: EngineConfig, prompt: str, *, chat: bool, **sampling) -> Iterator[str]:
    """Yield the completion of `prompt` piece by piece as tokens are generated."""
    engine = LLMEngine(config)
    tokenizer = load_tokenizer(engine.files)
    if tokenizer is None:
        raise InvalidRequestError("model", f"{engine.files.name} has no tokenizer")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer.encode(prompt)
    (seq,) = engine.add_request("cli", ids, SamplingParams(**sampling))
    printed = ""
    while engine.has_unfinished_requests():
        engine.step()
        # Decode everything so far: a token can complete a multi-byte character.
        text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text
