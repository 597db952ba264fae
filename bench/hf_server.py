"""The baseline a user without pdserve would run: transformers `generate()` behind the
simplest OpenAI-style server, one request at a time, streaming.

    python -m bench.hf_server [--port 8300] [--model default] [--threads N]

Only what the benchmark sends is served: POST /v1/completions (prompt text,
max_tokens, temperature 0, stream, ignore_eos), GET /v1/models and GET /ready.
"""

import argparse
import asyncio
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class _QueueStreamer(BaseStreamer):
    """Hands each new token id to an asyncio queue (generate() calls put() from its
    thread: first with the prompt, then once per new token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(model_dir: str, name: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    app = FastAPI()
    one_at_a_time = asyncio.Lock()

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        max_tokens = int(body.get("max_tokens", 16))
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        kwargs = dict(max_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=tokenizer.eos_token_id)
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens

        async def tokens():
            async with one_at_a_time:
                loop, queue = asyncio.get_running_loop(), asyncio.Queue()
                streamer = _QueueStreamer(loop, queue)

                def work():
                    with torch.inference_mode():
                        model.generate(ids, streamer=streamer, **kwargs)

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                try:
                    while (token := await queue.get()) is not None:
                        yield token
                finally:
                    # generate() cannot be interrupted: hold the lock until it is done,
                    # so a client that left early never makes two run at once.
                    await asyncio.to_thread(thread.join)

        usage = lambda n: {"prompt_tokens": ids.shape[1], "completion_tokens": n,  # noqa: E731
                           "total_tokens": ids.shape[1] + n}
        if not body.get("stream"):
            out = [t async for t in tokens()]
            return JSONResponse({"object": "text_completion", "model": name,
                                 "choices": [{"index": 0, "text": tokenizer.decode(out),
                                              "finish_reason": "length"}],
                                 "usage": usage(len(out))})

        async def events():
            n = 0
            async for token in tokens():
                n += 1
                chunk = {"object": "text_completion", "created": int(time.time()),
                         "model": name, "choices": [{"index": 0, "finish_reason": None,
                                                     "text": tokenizer.decode([token])}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage(n)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--model", default="default", help="'default' or a HF folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir == "default":
        from model_store.default_model import ensure_default_model
        model_dir = str(ensure_default_model())
    uvicorn.run(create_app(model_dir, "default"), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
