"""Command-line flags built from config dataclasses, so that each flag's default and help
are written once, on the field (`max_inflight` becomes `--max-inflight`).

A field's metadata may hold `help`, `choices`, `type` (a parser from the flag's text,
for values such as comma lists) and `repeatable` (the flag may be given several times,
its values collected); otherwise the type comes from the annotation. A field
without a default is a required flag. A boolean that defaults to False is switched on by
`--name`; one that defaults to True is switched off by `--no-name`.
"""

import argparse
import dataclasses
import types
import typing


def option_name(field: dataclasses.Field) -> str:
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.type is bool and field.default is True else f"--{name}"


def _value_type(field: dataclasses.Field):
    """The parser of a flag's text: metadata's `type`, else the (non-None) annotation."""
    if "type" in field.metadata:
        return field.metadata["type"]
    kind = field.type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind not in (int, float, str):
        raise TypeError(f"field {field.name}: give metadata 'type' for {field.type!r}")
    return kind


def add_config_flags(parser: argparse.ArgumentParser, config_class, *, exclude=(),
                     title: str | None = None) -> None:
    """One flag per field of `config_class` except those named in `exclude`."""
    target = parser.add_argument_group(title) if title else parser
    for field in dataclasses.fields(config_class):
        if field.name in exclude:
            continue
        help_text = field.metadata.get("help")
        if field.type is bool:
            default_on = field.default is True
            target.add_argument(option_name(field), dest=field.name,
                                action="store_false" if default_on else "store_true",
                                help=f"turn off: {help_text}" if default_on else help_text)
            continue
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        repeated = {"action": _Repeated} if field.metadata.get("repeatable") else {}
        target.add_argument(option_name(field), dest=field.name, type=_value_type(field),
                            default=default, required=required,
                            choices=field.metadata.get("choices"), help=help_text,
                            **repeated)


class _Repeated(argparse.Action):
    """A flag given several times collects its values (`--lora a=x --lora b=y`); the
    command line replaces the default (or the environment's value) rather than adding
    to it. Its `type` parses one use into a tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        earlier = () if current is self.default or current is None else tuple(current)
        setattr(namespace, self.dest, earlier + tuple(values))


def config_from_args(config_class, args: argparse.Namespace):
    """An instance from the parsed flags; fields without a flag keep their defaults.
    Raises ValueError (from the config's own checks) for bad values."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if hasattr(args, f.name)}
    return config_class(**values)


def changed_flags(config_class, args: argparse.Namespace, *, exclude=()) -> list[str]:
    """The command line that gives another process the same values for the fields that
    differ from their defaults (how `pdserve up` passes its flags on to its children)."""
    argv: list[str] = []
    for field in dataclasses.fields(config_class):
        if field.name in exclude or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if value == field.default or value is None:
            continue
        if field.type is bool:
            argv.append(option_name(field))
        elif isinstance(value, tuple):
            argv += [option_name(field), ",".join(map(str, value))]
        else:
            argv += [option_name(field), str(value)]
    return argv
