"""The FastAPI application: lifespan (pools, tokenizer, metrics), middleware, endpoints.

The gRPC channels open once in the lifespan and live in `app.state`; the request id
(X-Request-Id, generated when absent) is set by middleware, returned in the response,
sent to the workers in gRPC metadata and put on every log line of the request.
"""

import contextlib
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_store.paths import DEFAULT_MODEL_NAME, default_model_dir, is_complete
from pdserve_config import tracing
from pdserve_config.security import NO_SECURITY, SecurityConfig
from server import openapi_schema
from server.adapters import GatewayAdapters
from server.admission import Admission
from server.api_keys import ApiKeys
from server.errors import APIError
from server.gateway import GatewayConfig
from server.lora_api import lora_routes
from server.metrics import GatewayMetrics
from server.openai_api import openai_routes
from server.pool import WorkerPool
from server.request_context import request_id_var
from server.response_store import default_store_url, open_store
from server.responses_api import responses_routes
from server.router import Router
from server.tokenizer import GatewayTokenizer

log = logging.getLogger("pdserve.gateway")


def _model_folder(model: str) -> tuple[Path, str]:
    """The folder whose tokenizer and chat template the gateway uses, and its name."""
    if model == "default" or model.startswith("random:"):
        return _default_model_folder(), DEFAULT_MODEL_NAME if model == "default" else model
    path = Path(model).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise SystemExit(f"pdserve gateway: --model {model}: no tokenizer.json in that folder")
    return path, path.name


def _default_model_folder() -> Path:
    """The default model's folder, converted first where no worker has done it yet. The
    conversion runs in a child process: it loads torch, which the gateway never does."""
    folder = default_model_dir()
    if not is_complete(folder):
        done = subprocess.run([sys.executable, "-m", "model_store.default_model"],
                              stdout=subprocess.DEVNULL)
        if done.returncode != 0 or not is_complete(folder):
            raise SystemExit(f"pdserve gateway: cannot prepare the default model in {folder} "
                             f"(exit code {done.returncode}; see the messages above)")
    return folder


def create_app(config: GatewayConfig, security: SecurityConfig = NO_SECURITY) -> FastAPI:
    try:
        api_keys = ApiKeys.from_settings(config.api_key, config.api_key_file,
                                         config.api_key_priority)
    except ValueError as exc:
        raise SystemExit(f"pdserve gateway: {exc}") from None
    folder, name = _model_folder(config.model)
    tokenizer = GatewayTokenizer.from_folder(folder)
    metrics = GatewayMetrics()

    def on_health(worker, removed: bool = False, restarted: bool = False) -> None:
        if removed:
            metrics.forget_worker(worker.address, worker.role)
            return
        # A worker out of the rotation shows as down with no load: its last report
        # would keep showing the batch it had when it died.
        h = worker.health if worker.healthy else None
        hit_ratio = (h.prefix_hit_tokens / h.prefix_queried_tokens
                     if h and h.prefix_queried_tokens else 0.0)
        if restarted:
            metrics.worker_restarted(worker.address, worker.role)
        metrics.worker_health(worker.address, worker.role, worker.healthy,
                              h.free_kv_blocks if h else 0, h.total_kv_blocks if h else 0,
                              h.running if h else 0, h.waiting if h else 0,
                              h.queued_prompt_tokens if h else 0, hit_ratio)

    pool_args = dict(poll_interval=config.health_interval,
                     resolve_interval=config.resolve_interval, on_health=on_health,
                     security=security)
    decode = WorkerPool("decode", list(config.decode), **pool_args)
    prefill = WorkerPool("prefill", list(config.prefill), **pool_args) if config.prefill else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for pool in (decode, prefill):
            if pool is not None:
                await pool.start()
        log.info("gateway up: decode %s, prefill %s; %d API key(s); to the workers: "
                 "internal token %s, mutual TLS %s", ",".join(config.decode),
                 ",".join(config.prefill) or "none (colocated)", len(api_keys),
                 "on" if security.internal_token else "off", "on" if security.tls else "off")
        yield
        for pool in (decode, prefill):
            if pool is not None:
                await pool.close()
        await app.state.response_store.close()

    # FastAPI's own OpenTelemetry server span is each API request's root span (a child
    # of the caller's when it sends a traceparent); the probes and /metrics stay out.
    app = FastAPI(title="pdserve", lifespan=lifespan, telemetry={
        "operation_spans": False, "metrics": False, "logs": False,
        "exclude": lambda scope: not scope.get("path", "").startswith("/v1/")})
    openapi_schema.install(app)
    app.state.config = config
    app.state.model_name = config.served_model_name or name
    app.state.model_aliases = {app.state.model_name, config.model, name}
    app.state.adapters = GatewayAdapters(decode, prefill, app.state.model_aliases)
    app.state.tokenizer = tokenizer
    app.state.metrics = metrics
    app.state.admission = Admission(config.max_inflight, config.max_queue,
                                    config.priority_aging_seconds,
                                    max_queue_wait=config.max_queue_wait)
    app.state.decode, app.state.prefill = decode, prefill
    app.state.router = Router(decode, prefill,
                              local_prefill_max_tokens=config.local_prefill_max_tokens,
                              request_timeout=config.request_timeout,
                              migration_limit=config.migration_limit,
                              on_migrate=metrics.migrated)
    try:
        app.state.response_store = open_store(config.response_store or default_store_url(),
                                              config.response_ttl or None)
    except ValueError as exc:
        raise SystemExit(f"pdserve gateway: --response-store: {exc}") from None
    app.state.started = int(time.time())
    app.include_router(openai_routes)
    app.include_router(responses_routes)
    app.include_router(lora_routes)
    _install_handlers(app, config, api_keys)
    return app


class RequestContext:
    """Every request's id (X-Request-Id, generated when absent) in the log context and on
    its response; auth and the body limit checked before any body is read. A plain ASGI
    middleware: Starlette's @app.middleware("http") relays every chunk of a stream
    through a task and a memory stream, a cost each streamed token paid."""

    def __init__(self, app, *, config: GatewayConfig, api_keys: ApiKeys, metrics):
        self.app, self.config, self.api_keys, self.metrics = app, config, api_keys, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rid = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex[:16]}"
        request.state.request_id = rid
        token = request_id_var.set(rid)
        try:
            error = _check_request(request, self.config, self.api_keys)
            if error:
                self.metrics.rejected(error.status)
                headers = {**(error.headers or {}), "X-Request-Id": rid}
                await JSONResponse(error.body(), error.status, headers=headers)(
                    scope, receive, send)
                return

            async def send_with_id(message) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["X-Request-Id"] = rid
                await send(message)

            tracing.annotate({"pdserve.request_id": rid})
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _install_handlers(app: FastAPI, config: GatewayConfig, api_keys: ApiKeys) -> None:
    app.add_middleware(RequestContext, config=config, api_keys=api_keys,
                       metrics=app.state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        if exc.status >= 500:
            log.warning("request %s: %s", getattr(request.state, "request_id", "-"), exc)
        app.state.metrics.rejected(exc.status)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return await api_error(request, APIError(400, f"invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, exc: StarletteHTTPException):
        """No such path, or another method than the path takes: OpenAI's shape too."""
        return await api_error(request, APIError(
            exc.status_code, f"{exc.detail} ({request.method} {request.url.path})",
            headers=dict(exc.headers or {})))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        pools = {"decode": app.state.decode}
        if app.state.prefill is not None:
            pools["prefill"] = app.state.prefill
        counts = {role: len(pool.healthy()) for role, pool in pools.items()}
        ok = all(counts.values())
        body = {"status": "ready" if ok else "not ready",
                "healthy_workers": counts}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        admission = app.state.admission
        app.state.metrics.set_running(admission.running)
        app.state.metrics.set_waiting(admission.waiting)
        body, content_type = app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        """The base model and every LoRA adapter a request may name in `model`, with
        vLLM's `root` (where it was loaded from) and `parent` (an adapter's base)."""
        state = app.state
        entry = {"object": "model", "created": state.started, "owned_by": "pdserve",
                 "max_model_len": _max_context(app)}
        base = {"id": state.model_name, **entry, "root": state.config.model, "parent": None}
        return {"object": "list", "data": [base, *(
            {"id": name, **entry, "root": path or name, "parent": state.model_name}
            for name, path in state.adapters.known().items())]}


def _check_request(request: Request, config: GatewayConfig,
                   api_keys: ApiKeys) -> APIError | None:
    """Auth and body size, before any body is read."""
    if api_keys and request.url.path.startswith("/v1/"):
        authorization = request.headers.get("authorization", "")
        if not api_keys.accepts(authorization):
            return APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                            code="invalid_api_key")
        request.state.default_priority = api_keys.priority(authorization)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > config.max_body_bytes:
        return APIError(413, f"request body of {length} bytes is over the limit of "
                             f"{config.max_body_bytes} bytes", code="body_too_large")
    return None


def _max_context(app: FastAPI) -> int:
    from_workers = app.state.decode.max_seq_len
    return from_workers or app.state.tokenizer.max_context
