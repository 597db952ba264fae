"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's admin endpoints for
LoRA adapters, with its request bodies and plain-text answers, behind the same API key
as the rest of /v1/. They act on every worker of both pools (server.adapters)."""

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from server.openai_api import json_body
from server.protocol import parse_model

lora_routes = APIRouter()

# A name that shows in /v1/models and is sent in every request's `model`: printable,
# no spaces, bounded.
AdapterName = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]+$", max_length=128)]


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: AdapterName
    # A folder every worker can read at this same path (PEFT's save_pretrained layout).
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: AdapterName
    lora_int_id: int | None = None  # vLLM's; accepted and ignored: names identify adapters


@lora_routes.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    state = request.app.state
    req = parse_model(LoadLoraAdapterRequest, await json_body(request))
    await state.adapters.load(req.lora_name, req.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@lora_routes.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    state = request.app.state
    req = parse_model(UnloadLoraAdapterRequest, await json_body(request))
    await state.adapters.unload(req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
