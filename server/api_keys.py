"""The API keys the gateway accepts on /v1/*: from `--api-key` (one key or a comma list)
and `--api-key-file` (one key a line), read once at start, each with the priority its
requests get when they name none (`--api-key-priority KEY=N,...`, or `KEY priority=N`
in the file; 0 otherwise).

Several keys let clients move to a new key before the old one is dropped, or tell
clients apart by key. A presented key is compared with every accepted key in constant
time, and with all of them whatever the first comparisons gave, so that the time an
answer takes says neither how much of a key was right nor which key came close.
"""

import hmac
from pathlib import Path


def keys_from_file(path: str) -> dict[str, int | None]:
    """One key a line, optionally followed by `priority=N`; blank lines and lines starting
    with # are skipped. A file with no key is an error: starting without authentication
    by a typo is not an option."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys: dict[str, int | None] = {}
    for number, line in enumerate(lines, 1):
        key, _, rest = line.strip().partition(" ")
        if not key or key.startswith("#"):
            continue
        keys[key] = None
        if rest.strip():
            name, _, value = rest.strip().partition("=")
            if name != "priority" or not _is_int(value):
                raise ValueError(f"--api-key-file {path}, line {number}: after the key only "
                                 f"'priority=N' may follow (got {rest.strip()!r})")
            keys[key] = int(value)
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it (only blank lines or comments)")
    return keys


def _is_int(text: str) -> bool:
    return text.strip().removeprefix("-").isdigit()


def parse_priorities(value: str | None) -> dict[str, int]:
    """`--api-key-priority KEY=N,KEY=N` as a mapping."""
    out = {}
    for entry in (value or "").split(","):
        if not entry.strip():
            continue
        key, sep, priority = entry.strip().rpartition("=")
        if not sep or not key or not _is_int(priority):
            raise ValueError(f"--api-key-priority: {entry.strip()!r} is not KEY=N")
        out[key] = int(priority)
    return out


class ApiKeys:
    def __init__(self, keys: list[str], priorities: dict[str, int] | None = None):
        # Unique and as bytes: compare_digest takes only ASCII str, and a key may not be.
        self._keys = tuple(dict.fromkeys(key.encode() for key in keys))
        priorities = priorities or {}
        unknown = set(priorities) - set(keys)
        if unknown:
            raise ValueError(f"--api-key-priority names {len(unknown)} key(s) that are not "
                             "accepted (--api-key, --api-key-file)")
        self._priorities = {key.encode(): p for key, p in priorities.items()}

    @classmethod
    def from_settings(cls, api_key: str | None, api_key_file: str | None,
                      api_key_priority: str | None = None) -> "ApiKeys":
        keys = {key.strip(): None for key in (api_key or "").split(",") if key.strip()}
        if api_key_file:
            keys.update(keys_from_file(api_key_file))
        priorities = {key: p for key, p in keys.items() if p is not None}
        priorities.update(parse_priorities(api_key_priority))
        return cls(list(keys), priorities)

    def __bool__(self) -> bool:
        """Whether any key is required at all."""
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def accepts(self, authorization: str) -> bool:
        """Whether an `Authorization` header value carries one of the keys."""
        return self._match(authorization) is not None

    def priority(self, authorization: str) -> int:
        """The default priority of the key presented (0 for none or an unknown one)."""
        key = self._match(authorization) if self._priorities else None
        return self._priorities.get(key, 0) if key is not None else 0

    def _match(self, authorization: str) -> bytes | None:
        scheme, _, presented = authorization.strip().partition(" ")
        # The server decodes header bytes as latin-1: encoding back gives the bytes sent,
        # which a client sending a UTF-8 key sent as the key's UTF-8 bytes.
        candidate = presented.strip().encode("latin-1", "replace")
        # Every comparison runs, a list and not a short-circuiting any() over a generator.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matches):
            return None
        return self._keys[matches.index(True)]
