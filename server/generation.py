"""The choices of one HTTP request, run concurrently and turned from tokens into text.

Every choice (each prompt times `n`) is its own generation through the router. Tokens
are detokenized incrementally and checked against the stop strings; text that could
still turn into a stop string is held back, so nothing past a stop string ever reaches
the client. Leaving `deltas()` early cancels every choice, and with it both gRPC legs.
"""

import asyncio
import contextlib
from dataclasses import dataclass, field

from pdserve_proto.v1 import common_pb2
from server.detokenizer import IncrementalDetokenizer, StopChecker
from server.errors import APIError
from server.events import FinishEvent, PrefillEvent, PromptLogprobsEvent, TokenEvent
from server.router import Router


@dataclass
class TextLogprob:
    """One token as the client sees it: its text, logprob and alternatives (None for
    the first prompt token, which nothing predicts)."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None


@dataclass
class Delta:
    index: int
    text: str = ""
    logprobs: list[TextLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # on the finishing delta: prompt tokens taken from a cache


@dataclass
class Choice:
    index: int
    prompt: list[int]
    params: common_pb2.SamplingParams
    # max_tokens 0 (with echo): the workers generate one token, which is not returned.
    drop_output: bool = False


class StreamBroken(Exception):
    """A choice failed after it had started streaming."""

    def __init__(self, index: int, error: APIError):
        super().__init__(error.message)
        self.index = index
        self.error = error


class Generation:
    def __init__(self, router: Router, tokenizer, request_id: str, choices: list[Choice], *,
                 stop: list[str], want_logprobs: bool, skip_special_tokens: bool, recorder,
                 lora: str | None = None):
        self.router = router
        self.lora = lora  # the LoRA adapter every choice runs under (None: the base model)
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.choices = choices
        self.stop = stop
        self.want_logprobs = want_logprobs
        self.skip_special_tokens = skip_special_tokens
        self.recorder = recorder
        self._queue: asyncio.Queue = asyncio.Queue()

    async def deltas(self):
        """Deltas of all choices in arrival order; each choice ends with one Delta that
        has its finish_reason. Raises APIError when a choice fails before its first token,
        StreamBroken when one fails later."""
        tasks = [asyncio.create_task(self._run(c)) for c in self.choices]
        remaining = len(tasks)
        try:
            while remaining:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def gathered(self) -> list[Delta]:
        """Every delta, for an answer given whole, with the request's end recorded; an
        error fails the request with its status."""
        deltas = []
        try:
            async for delta in self.deltas():
                deltas.append(delta)
        except StreamBroken as exc:
            self.recorder.finish("error")
            raise exc.error from None
        except APIError:
            self.recorder.finish("error")
            raise
        ends = [d for d in deltas if d.finish_reason is not None]
        self.recorder.cached(sum(d.cached_tokens for d in ends))
        self.recorder.finish(ends[-1].finish_reason if ends else "stop")
        return deltas

    async def _run(self, choice: Choice) -> None:
        params = choice.params
        rid = self.request_id if len(self.choices) == 1 else f"{self.request_id}-{choice.index}"
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=choice.prompt,
                                       skip_special_tokens=self.skip_special_tokens)
        stops = StopChecker(self.stop)
        tokens = 0
        cached = 0  # prompt tokens the worker that computed the prompt took from its cache
        try:
            async for event in self.router.generate(rid, choice.prompt, params, self.lora):
                if isinstance(event, PrefillEvent):
                    self.recorder.prefill(event.compute_seconds, event.transfer_seconds,
                                          event.kv_bytes, event.kv_bytes_skipped)
                    continue
                if isinstance(event, PromptLogprobsEvent):
                    self._queue.put_nowait(Delta(choice.index, "", [
                        self._text_logprob(t) for t in event.tokens]))
                    continue
                if choice.drop_output:  # the prompt was all that was asked for
                    self._queue.put_nowait(Delta(choice.index, "", [], "length", 0,
                                                 event.cached_prompt_tokens))
                    return
                if isinstance(event, FinishEvent):
                    reason = event.reason if event.reason in ("stop", "length") else "abort"
                    if reason == "abort":
                        raise APIError(502, f"the decode worker ended the request "
                                            f"({event.reason})")
                    text, stopped = stops.feed(detok.flush())
                    if not stopped:
                        text += stops.flush()
                    self._queue.put_nowait(Delta(choice.index, text, [], reason, tokens,
                                                 cached))
                    return
                if tokens == 0:
                    cached = event.cached_prompt_tokens
                tokens += 1
                self.recorder.token()
                text, stopped = stops.feed(detok.push(event.token_id))
                delta = Delta(choice.index, text, self._logprobs(event))
                if stopped:
                    delta.finish_reason, delta.completion_tokens = "stop", tokens
                    delta.cached_tokens = cached
                    self._queue.put_nowait(delta)
                    return  # leaving the router's generator cancels both legs
                if delta.text or delta.logprobs:
                    self._queue.put_nowait(delta)
        except APIError as exc:
            self._queue.put_nowait(exc if tokens == 0 else StreamBroken(choice.index, exc))
        except Exception as exc:  # never leave the consumer waiting forever
            error = APIError(500, f"internal error: {exc!r}")
            self._queue.put_nowait(error if tokens == 0 else StreamBroken(choice.index, error))

    def _logprobs(self, event: TokenEvent) -> list[TextLogprob]:
        if not self.want_logprobs or event.logprob is None:
            return []
        return [self._text_logprob(event)]

    def _text_logprob(self, event: TokenEvent) -> TextLogprob:
        text = self.tokenizer.id_to_token_text
        if event.logprob is None:
            return TextLogprob(text(event.token_id), None, None)
        return TextLogprob(text(event.token_id), event.logprob,
                           [(text(t), lp) for t, lp in event.top_logprobs])
