"""Structured outputs: which grammar, if any, a request's output must match.

OpenAI's `response_format` (`json_object`, or `json_schema` with a schema) and vLLM's
extensions (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, a Lark
grammar in llguidance's dialect) become one SamplingParams.grammar, checked here with
the same compiler the workers use (pdserve_proto.grammars), so a bad schema is a 400
naming its field before anything reaches a worker.
"""

import asyncio
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve_proto.grammars import GrammarError, to_llguidance
from server.errors import invalid

_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False,
                     populate_by_name=True)


class JsonSchemaFormat(BaseModel):
    model_config = _CONFIG
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Guided(BaseModel):
    """The fields a request may constrain its output with (mixed into both requests)."""

    model_config = _CONFIG
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None


def requested_grammar(req: Guided) -> tuple[str, str, str] | None:
    """(kind, spec, the request field it came from) of the one constraint the request
    sets, or None; a 400 when it sets several or an incomplete one."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_object", "", "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format.json_schema.schema",
                          "response_format of type json_schema needs json_schema.schema")
        schema = fmt.json_schema.schema_
        if fmt.json_schema.strict:
            schema = closed(schema)
        found.append(("json_schema", json.dumps(schema), "response_format.json_schema.schema"))
    if req.guided_json is not None:
        spec = req.guided_json if isinstance(req.guided_json, str) else json.dumps(
            req.guided_json)
        found.append(("json_schema", spec, "guided_json"))
    if req.guided_regex is not None:
        found.append(("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        found.append(("choice", json.dumps(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        found.append(("lark", req.guided_grammar, "guided_grammar"))
    if len(found) > 1:
        names = ", ".join(param for _, _, param in found)
        raise invalid(found[1][2], f"only one output constraint at a time, got {names}")
    return found[0] if found else None


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def closed(schema):
    """The schema with every object closed (additionalProperties false where it says
    nothing), as OpenAI's strict mode reads a schema: otherwise a sampled output may go
    on adding keys of its own until it runs out of tokens."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = closed(out[key])
    if isinstance(out.get("items"), dict | list):
        out["items"] = closed(out["items"])
    if (out.get("type") == "object" or "properties" in out) and \
            "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


async def check_grammar(kind: str, spec: str, param: str) -> None:
    """Compile the grammar as the workers will (in a thread: a big schema takes
    milliseconds the first time; then it is cached); a 400 naming `param` if it is bad."""
    try:
        await asyncio.to_thread(to_llguidance, kind, spec)
    except GrammarError as exc:
        raise invalid(param, f"{param}: {exc}") from None


async def check_schema(schema: dict, param: str) -> None:
    """A JSON schema compiles (a tool's parameters); a 400 naming `param` if not."""
    await check_grammar("json_schema", json.dumps(schema), param)
