"""The checks every request to a worker passes before the engine sees it, one for both
services: a request id, sampling parameters the engine accepts, a prompt inside the
vocabulary and the context, a grammar that compiles. A failure is a StatusError naming
what was wrong; the services turn it into the RPC's status at their boundary."""

import grpc

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from worker.convert import compile_grammar, params_from_proto
from worker.status import StatusError, status_of


async def validated(engine: LLMEngine, request_id: str, prompt, params) -> SamplingParams:
    """The engine's SamplingParams of a request whose id, prompt and proto `params` are
    valid; the grammar, if any, compiled off the event loop (and cached)."""
    if not request_id:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
    try:
        sampling = params_from_proto(params)
        engine.validate_prompt(list(prompt))
        await compile_grammar(sampling)
    except InvalidRequestError as exc:
        raise status_of(exc) from None
    return sampling
