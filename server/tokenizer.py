"""The model's tokenizer and chat template for the gateway, without torch or transformers.

`tokenizers` reads tokenizer.json; the chat template renders in a sandboxed jinja2
environment set up the way Hugging Face sets up its own, so prompts come out token for
token the same as `AutoTokenizer.apply_chat_template`.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class GatewayTokenizer:
    def __init__(self, tokenizer: Tokenizer, template: str | None, bos: str | None,
                 eos: str | None, eos_token_ids: tuple[int, ...], max_context: int):
        self._tok = tokenizer
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
                x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(template)
        self.bos_token, self.eos_token = bos, eos
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder) -> "GatewayTokenizer":
        folder = Path(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tcfg = _read_json(folder / "tokenizer_config.json")
        config = _read_json(folder / "config.json")
        gen = _read_json(folder / "generation_config.json")
        template_file = folder / "chat_template.jinja"
        template = (template_file.read_text() if template_file.is_file()
                    else tcfg.get("chat_template"))
        bos, eos = _token_text(tcfg.get("bos_token")), _token_text(tcfg.get("eos_token"))
        ids: list[int] = []
        for source in (config.get("eos_token_id"), gen.get("eos_token_id")):
            ids.extend(source if isinstance(source, list) else [source])
        if eos is not None:
            ids.append(tok.token_to_id(eos))
        eos_ids = tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))
        return cls(tok, template, bos, eos, eos_ids,
                   int(config.get("max_position_embeddings") or 2048))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("the model has no chat template; use /v1/completions")
        try:
            return self._template.render(messages=messages, bos_token=self.bos_token,
                                         eos_token=self.eos_token,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(str(exc)) from None

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> list[int]:
        # The rendered text already holds the special tokens (BOS and the like); HF adds
        # none of its own when it tokenizes a rendered template, so neither do we.
        text = self.render_chat(messages, add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)
