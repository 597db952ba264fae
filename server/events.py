"""What one generation yields inside the gateway, made from the workers' messages here,
at the process boundary: tokens, where the first token's time went, prompt logprobs, and
the finish with OpenAI's name for its reason."""

from dataclasses import dataclass, field

from pdserve_proto.v1 import decode_pb2
from server.errors import APIError


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # first token only: the prompt's prefix-cache hit


@dataclass
class PrefillEvent:
    """Where the first token's time went, as the prefill worker measured it."""

    queue_seconds: float
    compute_seconds: float
    transfer_seconds: float
    transfer_tail_seconds: float
    kv_bytes: int
    worker: str
    kv_bytes_skipped: int = 0  # KV the decode worker held already, not sent


@dataclass
class PromptLogprobsEvent:
    """Before the first token, when asked for: a TokenEvent per prompt position."""

    tokens: list[TokenEvent]


@dataclass
class FinishEvent:
    reason: str
    prompt_tokens: int
    completion_tokens: int


# The wire's finish reasons as OpenAI names them (the engine's own rule decided them).
FINISH_REASONS = {decode_pb2.FINISH_REASON_STOP: "stop",
                  decode_pb2.FINISH_REASON_LENGTH: "length",
                  decode_pb2.FINISH_REASON_ABORT: "abort"}


def token_event(msg) -> TokenEvent:
    top = [(alt.token_id, alt.logprob) for alt in msg.top_logprobs]
    return TokenEvent(msg.token_id, msg.logprob if msg.HasField("logprob") else None, top,
                      msg.cached_prompt_tokens)


def prompt_logprobs_event(msg) -> PromptLogprobsEvent:
    return PromptLogprobsEvent([token_event(token) for token in msg.tokens])


def event_of(message):
    """A decode worker's GenerateResponse (token, finish, prompt logprobs) as its event."""
    kind = message.WhichOneof("item")
    if kind == "token":
        return token_event(message.token)
    if kind == "finished":
        f = message.finished
        if f.finish_reason not in FINISH_REASONS:
            raise APIError(502, f"decode worker sent finish reason {f.finish_reason}, "
                                "which this gateway does not know")
        return FinishEvent(FINISH_REASONS[f.finish_reason], f.prompt_tokens,
                           f.completion_tokens)
    if kind == "prompt_logprobs":
        return prompt_logprobs_event(message.prompt_logprobs)
    raise APIError(502, f"decode worker sent an unexpected {kind!r} message")
