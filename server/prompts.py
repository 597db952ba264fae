"""The prompt of a request as token ids take it: completions' prompt entries, and chat
messages (with their tools) as the model's chat template takes them."""

import json

from server.errors import invalid
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tools import history_content, system_prompt


def prompt_inputs(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request, one per entry: text, or token ids."""
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise invalid("prompt", "prompt must not be empty")
    for i, item in enumerate(prompts):
        if len(item) == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            raise invalid("prompt", f"{where} must not be empty")
    return prompts


def check_token_ids(ids, vocab_size: int, *, param: str = "prompt") -> None:
    for t in ids:
        if not 0 <= int(t) < vocab_size:
            raise invalid(param, f"token id {t} is outside the vocabulary [0, {vocab_size})")


def template_messages(req: ChatCompletionRequest, *,
                      template_takes_tools: bool) -> list[dict]:
    """Messages as the chat template takes them ("developer" is the newer name of
    "system"). A template that takes no tools gets them described in the system message,
    earlier calls written as the model writes them, and tool results as user turns."""
    tools = req.callable_tools
    out: list[dict] = []
    for m in (m.model_dump(exclude_none=True) for m in req.messages):
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content}
        if template_takes_tools:
            if m.get("tool_calls"):
                # HF templates take the arguments as a mapping, not OpenAI's string.
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
            if role == "tool":
                message["tool_call_id"] = m["tool_call_id"]
        elif role == "assistant" and m.get("tool_calls"):
            message["content"] = history_content(m)
        elif role == "tool":
            message = {"role": "user", "content": f"<tool_response>{content}</tool_response>"}
        out.append(message)
    if tools and not template_takes_tools:
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system_prompt(tools)}
        else:
            out.insert(0, {"role": "system", "content": system_prompt(tools)})
    return out


def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools as a template that takes them reads them (None when there are none)."""
    tools = req.callable_tools
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None
