"""The API keys the gateway accepts on /v1/*: from `--api-key` (one key or a comma list)
and `--api-key-file` (one key a line), read once at start.

Several keys let clients move to a new key before the old one is dropped, or tell
clients apart by key. A presented key is compared with every accepted key in constant
time, and with all of them whatever the first comparisons gave, so that the time an
answer takes says neither how much of a key was right nor which key came close.
"""

import hmac
from pathlib import Path


def keys_from_file(path: str) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped. A file with no
    key is an error: starting without authentication by a typo is not an option."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys = [line.strip() for line in lines]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it (only blank lines or comments)")
    return keys


class ApiKeys:
    def __init__(self, keys: list[str]):
        # Unique and as bytes: compare_digest takes only ASCII str, and a key may not be.
        self._keys = tuple(dict.fromkeys(key.encode() for key in keys))

    @classmethod
    def from_settings(cls, api_key: str | None, api_key_file: str | None) -> "ApiKeys":
        keys = [key.strip() for key in (api_key or "").split(",") if key.strip()]
        if api_key_file:
            keys += keys_from_file(api_key_file)
        return cls(keys)

    def __bool__(self) -> bool:
        """Whether any key is required at all."""
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def accepts(self, authorization: str) -> bool:
        """Whether an `Authorization` header value carries one of the keys."""
        scheme, _, presented = authorization.strip().partition(" ")
        # The server decodes header bytes as latin-1: encoding back gives the bytes sent,
        # which a client sending a UTF-8 key sent as the key's UTF-8 bytes.
        candidate = presented.strip().encode("latin-1", "replace")
        # Every comparison runs, a list and not a short-circuiting any() over a generator.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        return scheme.lower() == "bearer" and any(matches)
