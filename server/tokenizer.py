"""The model's tokenizer and chat template for the gateway, without torch or transformers.

`tokenizers` reads tokenizer.json; the chat template renders in a sandboxed jinja2
environment set up the way Hugging Face sets up its own, so prompts come out token for
token the same as `AutoTokenizer.apply_chat_template`. The gateway must stay a light
process, so nothing here may import torch or transformers.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

_DEFAULT_CONTEXT = 2048  # used when config.json does not say how long a context can be
# The named special tokens HF hands to every chat template (its special_tokens_map).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens either as text or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _raise_exception(message: str):
    # Templates call raise_exception() to reject conversations they cannot render
    # (e.g. roles out of order); HF turns it into a TemplateError, and so do we.
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF replaces jinja's own tojson (which HTML-escapes) with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    HF templates use the tag to mark assistant tokens for training masks; without this
    extension such templates would not even compile here.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _template_source(folder: Path, tcfg: dict) -> str | None:
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # older format: a list of named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template or None


class GatewayTokenizer:
    def __init__(self, tokenizer: Tokenizer, template: str | None, special_tokens: dict,
                 eos_token_ids: tuple[int, ...], max_context: int):
        self._tok = tokenizer
        self.special_tokens = special_tokens  # name -> text, e.g. "eos_token" -> "<|im_end|>"
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # A broken template must not stop the gateway from serving plain completions,
        # so a compile error is kept and reported only when a chat request comes in.
        self._template: jinja2.Template | None = None
        self._template_error = "the model has no chat template; use /v1/completions"
        # Whether the template renders a `tools` variable itself (else server.tools
        # describes the tools in the system message).
        self.template_takes_tools = False
        if template:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True,
                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(template)
                self.template_takes_tools = "tools" in jinja2.meta.find_undeclared_variables(
                    env.parse(template))
            except jinja2.exceptions.TemplateError as exc:
                self._template_error = f"the model's chat template does not compile: {exc}"

    @classmethod
    def from_folder(cls, folder) -> "GatewayTokenizer":
        folder = Path(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tcfg = _read_json(folder / "tokenizer_config.json")
        config = _read_json(folder / "config.json")
        gen = _read_json(folder / "generation_config.json")
        special = {name: text for name in _SPECIAL_TOKEN_NAMES
                   if (text := _token_text(tcfg.get(name))) is not None}
        eos = special.get("eos_token")
        # Any of these may end a generation: chat models often list several end tokens
        # in generation_config.json that config.json does not know about.
        ids: list = []
        for source in (config.get("eos_token_id"), gen.get("eos_token_id")):
            ids.extend(source if isinstance(source, list) else [source])
        if eos is not None:
            ids.append(tok.token_to_id(eos))
        eos_ids = tuple(dict.fromkeys(
            i for i in ids if isinstance(i, int) and not isinstance(i, bool)))
        # Multimodal configs keep the language model's settings under text_config.
        context = (config.get("max_position_embeddings")
                   or config.get("text_config", {}).get("max_position_embeddings")
                   or _DEFAULT_CONTEXT)
        return cls(tok, _template_source(folder, tcfg), special, eos_ids, int(context))

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=True runs tokenizer.json's post-processor (BOS for models that
        # want one), which is what calling an HF tokenizer on plain text does.
        return self._tok.encode(text).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        if self._template is None:
            raise ValueError(self._template_error)
        # HF drops keys whose value is None (OpenAI clients send "name": null and the
        # like) because templates test `is defined`, not `is none`; do the same.
        if isinstance(messages, list):
            messages = [{k: v for k, v in m.items() if v is not None}
                        if isinstance(m, dict) else m for m in messages]
        try:
            # tools/documents are passed as None, as HF does, so `is none` tests in
            # templates behave the same.
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from None
        except (TypeError, KeyError, IndexError, AttributeError) as exc:
            # Messages of an unexpected shape (content as a list, missing role, ...)
            # fail inside the template; the client sent them, so it is a ValueError.
            raise ValueError(f"chat template could not render these messages: "
                             f"{type(exc).__name__}: {exc}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        # The rendered text already holds the special tokens (BOS and the like); HF adds
        # none of its own when it tokenizes a rendered template, so neither do we.
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token_text(self, token_id: int) -> str:
        # OpenAI logprobs show each token's own text, special tokens included.
        return self._tok.decode([token_id], skip_special_tokens=False)
