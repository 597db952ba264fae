"""Between the wire's messages and the engine's types, for both workers.

Both workers must turn the same SamplingParams message into the same engine params,
and describe their model the same way, or a seeded request would draw different
tokens (or KV would be read as another model's) depending on the path it took.
"""

import asyncio

from engine.grammar import Grammar, compiled
from engine.llm_engine import LLMEngine
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from kvtransfer.codec import KvShape, make_fingerprint
from pdserve_proto.v1 import common_pb2, decode_pb2


def params_from_proto(msg) -> SamplingParams:
    """Engine params; raises InvalidRequestError naming the bad field."""
    return SamplingParams(
        max_tokens=msg.max_tokens, min_tokens=msg.min_tokens, temperature=msg.temperature,
        top_p=msg.top_p, top_k=msg.top_k if msg.top_k > 0 else -1, min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty, presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty, n=1,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        logit_bias=tuple(msg.logit_bias.items()),
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        grammar=Grammar(msg.grammar.kind, msg.grammar.spec) if msg.HasField("grammar")
        else None, priority=msg.priority)


def params_to_proto(params: SamplingParams):
    msg = common_pb2.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0),
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        max_tokens=params.max_tokens, min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        priority=params.priority)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    msg.logit_bias.update(dict(params.logit_bias))
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.grammar is not None:
        msg.grammar.kind, msg.grammar.spec = params.grammar.kind, params.grammar.spec
    return msg


# The reasons a Generate stream may end with; ERROR becomes a gRPC status instead, and
# PREFILLED belongs to prefill-only requests, which never stream.
_FINISH_TO_PROTO = {FinishReason.STOP: decode_pb2.FINISH_REASON_STOP,
                    FinishReason.LENGTH: decode_pb2.FINISH_REASON_LENGTH,
                    FinishReason.ABORT: decode_pb2.FINISH_REASON_ABORT}


def finish_reason_to_proto(reason: FinishReason) -> int:
    if reason not in _FINISH_TO_PROTO:
        raise ValueError(f"finish reason {reason!r} does not travel in Finished")
    return _FINISH_TO_PROTO[reason]


def token_to_proto(token_id: int, index: int, logprob: TokenLogprob | None):
    msg = common_pb2.Token(token_id=token_id, index=index)
    if logprob is not None:
        msg.logprob = logprob.logprob
        msg.top_logprobs.extend(common_pb2.TopLogprob(token_id=t, logprob=lp)
                                for t, lp in logprob.top.items())
    return msg


def prompt_logprobs_to_proto(prompt: list[int], entries: list[TokenLogprob | None]):
    """The prompt's logprobs as a PromptLogprobs message (see common.proto)."""
    return common_pb2.PromptLogprobs(tokens=[
        token_to_proto(token_id, position, entry)
        for position, (token_id, entry) in enumerate(zip(prompt, entries, strict=True))])


def token_from_proto(msg) -> SampledToken:
    logprob = None
    if msg.HasField("logprob"):
        top = {alt.token_id: alt.logprob for alt in msg.top_logprobs}
        logprob = TokenLogprob(msg.token_id, msg.logprob, top)
    return SampledToken(msg.token_id, logprob)


def engine_fingerprint(engine: LLMEngine):
    """What a KV stream of this engine's must match: model, dtype and quantization."""
    cfg, runner = engine.model_config, engine.runner
    shape = KvShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, runner.dtype)
    return make_fingerprint(cfg.architecture, shape, runner.weights_digest,
                            runner.quantization)


async def compile_grammar(params: SamplingParams) -> None:
    """Compile the request's grammar (once per spec: cached) in a thread, so that neither
    the event loop nor the engine thread waits for it; InvalidRequestError when bad."""
    if params.grammar is not None:
        await asyncio.to_thread(compiled, params.grammar)
