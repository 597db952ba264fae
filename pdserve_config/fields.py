"""The one way a config dataclass declares a command-line flag."""

from dataclasses import field


def flag(default, help: str, **extra):  # noqa: A002 - argparse's own word
    """A config field with the help text of its command-line flag; `extra` metadata such
    as `type` (the parser of the flag's text) goes to pdserve.config_flags."""
    return field(default=default, metadata={"help": help, **extra})
