"""How LoRA adapters are named: the `--lora NAME=PATH` text and the rule for a name.
No torch here: engine.config (and so `pdserve --help`) imports it."""

from engine.errors import InvalidRequestError

_NAME_FORBIDDEN = set(",= \t\n/")


def parse_lora_specs(text: str) -> tuple[str, ...]:
    """`--lora` / PDSERVE_LORA text: 'NAME=PATH[,NAME=PATH...]' as a tuple of
    'NAME=PATH' entries, checked so that a typo fails at the flag."""
    specs = tuple(part.strip() for part in text.split(",") if part.strip())
    for spec in specs:
        split_spec(spec)
    return specs


def split_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' as (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"LoRA adapter {spec!r}: expected NAME=PATH")
    check_name(name.strip())
    return name.strip(), path.strip()


def check_name(name: str) -> None:
    """Names travel in flags (NAME=PATH,...) and as the OpenAI `model` field."""
    if not isinstance(name, str) or not name or _NAME_FORBIDDEN & set(name):
        raise InvalidRequestError("lora", f"adapter name {name!r}: must be non-empty, "
                                          f"without spaces, '/', ',' or '='")
