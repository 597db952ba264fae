"""Every command-line flag can also come from the environment: `--max-inflight` from
`PDSERVE_MAX_INFLIGHT`, `--kv-cache-tokens` from `PDSERVE_KV_CACHE_TOKENS`.

Containers are configured this way (a Kubernetes ConfigMap, a compose `environment:`)
without repeating flags in every manifest. A flag given on the command line wins over
the environment; the value is parsed exactly as the flag's would be, so a bad value
fails at start with the flag's own error message.
"""

import argparse
import os

PREFIX = "PDSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(action: argparse.Action) -> str:
    return PREFIX + action.dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Set each optional flag's default from its environment variable, if set."""
    for action in parser._actions:  # argparse has no public walk over its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                apply_env_defaults(sub, environ)
            continue
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        value = environ.get(env_name(action))
        if value is None:
            continue
        action.default = _convert(parser, action, value)
        action.required = False


def _convert(parser, action: argparse.Action, value: str):
    name = env_name(action)
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            parser.error(f"{name}={value!r}: expected true or false")
        # The variable names the destination, so for `--no-pin` (dest `pin`)
        # PDSERVE_PIN=false turns pinning off.
        return lowered in _TRUE
    if action.type is None:
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={value!r}: choose from {', '.join(map(str, action.choices))}")
        return value
    try:
        converted = action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{name}={value!r}: {exc}")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"{name}={value!r}: choose from {', '.join(map(str, action.choices))}")
    return converted
