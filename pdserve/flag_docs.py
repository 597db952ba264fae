"""The flag tables of docs/configuration.md, written from the same config dataclasses as
the flags, so that the documented defaults can never drift from the code's.

    python -m pdserve.flag_docs           # print the tables
    python -m pdserve.flag_docs --write   # replace them in docs/configuration.md (between markers)
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from decode_worker.config import DecodeConfig
from engine.config import EngineConfig
from pdserve.config_flags import option_name
from pdserve.env_flags import PREFIX
from pdserve.stack import ENGINE_EXCLUDED, GATEWAY_EXCLUDED, SHARED_WITH_WORKERS, StackConfig
from pdserve_config.security import SecurityConfig
from pdserve_config.tracing import TracingConfig
from prefill_worker.config import PrefillConfig
from server.gateway import GatewayConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN = "<!-- flag tables: python -m pdserve.flag_docs --write -->"
END = "<!-- end of flag tables -->"
_NOT_IN_UP = ", ".join(f"`--{name}`" for name in GATEWAY_EXCLUDED
                       if name not in SHARED_WITH_WORKERS)
SECTIONS = (
    ("`pdserve gateway`", GatewayConfig),
    ("`pdserve prefill` (and the engine flags)", PrefillConfig),
    ("`pdserve decode` (and the engine flags)", DecodeConfig),
    (f"`pdserve up` (and the gateway flags but {_NOT_IN_UP}; and the engine flags but "
     f"`--num-threads`, passed on to every worker)", StackConfig),
    ("Engine flags, of every process that runs a model (`prefill`, `decode`, `generate`)",
     EngineConfig),
    ("gRPC security flags, of `gateway`, `prefill`, `decode`, `health` and `up` (which "
     "passes them on to every process, the token by environment)", SecurityConfig),
    ("OpenTelemetry tracing flags, of `gateway`, `prefill`, `decode` and `up` (which passes "
     "them on to every process)", TracingConfig),
)
assert ENGINE_EXCLUDED == ("num_threads",)  # as the heading above says


def _default(field: dataclasses.Field) -> str:
    value = field.default
    if value is dataclasses.MISSING:
        return "required"
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def table(config_class) -> str:
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(config_class):
        meaning = field.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{option_name(field)}` | `{PREFIX}{field.name.upper()}` | "
                    f"{_default(field)} | {meaning} |")
    return "\n".join(rows)


def tables() -> str:
    parts = [f"{title}:\n\n{table(cls)}" for title, cls in SECTIONS]
    return "\n\n".join([BEGIN, *parts, END])


def replace_in(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + tables() + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help="update docs/configuration.md in place")
    if parser.parse_args().write:
        DOC.write_text(replace_in(DOC.read_text()))
    else:
        sys.stdout.write(tables() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
