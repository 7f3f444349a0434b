"""Optional API keys: where they come from and how a request's key is checked.

Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from .._exceptions import ValidationError
from ._errors import ProxyError

__all__ = ["ENV_KEYS", "KeyChecker", "load_keys", "read_key_file"]

ENV_KEYS = "AICORTEX_API_KEYS"


def read_key_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys in a file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValidationError(
            f"Cannot read the API key file {os.fspath(path)!r}: {reason}."
        ) from None
    keys = [line.split("#", 1)[0].strip() for line in lines]
    keys = [k for k in keys if k]
    if not keys:
        raise ValidationError(
            f"The API key file {os.fspath(path)!r} holds no keys; "
            "write one key per line, or do not pass a key file to leave the proxy open."
        )
    return keys


def load_keys(
    api_keys: Iterable[str] | None = None,
    api_key_file: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The keys a client may present, from the first source that is given.

    ``api_keys``, else the lines of ``api_key_file``, else ``AICORTEX_API_KEYS``
    (comma-separated). No keys means the proxy is open.
    """
    if api_keys is not None:
        if isinstance(api_keys, str):
            raise ValidationError("api_keys must be a list of keys, not one string.")
        keys = [k.strip() for k in api_keys]
        if not all(keys):
            raise ValidationError("api_keys must not contain empty keys.")
        return keys
    if api_key_file is not None:
        return read_key_file(api_key_file)
    return [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]


_MISSING = (
    "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
    "(Authorization: Bearer YOUR_KEY)."
)
_WRONG = "Incorrect API key provided. Use one of the keys this proxy was started with."


class KeyChecker:
    """Checks the ``Authorization: Bearer <key>`` header against the configured keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def replace(self, keys: Iterable[str]) -> None:
        """Check against ``keys`` from now on (a reload of the key file)."""
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        """Whether any key is required."""
        return bool(self._keys)

    def matches(self, presented: bytes) -> bool:
        """Whether ``presented`` is one of the keys; every key is compared, in constant time."""
        return sum(hmac.compare_digest(presented, key) for key in self._keys) > 0

    def check(self, authorization: bytes | None) -> None:
        """Raise a 401 :class:`ProxyError` unless the header carries a valid key."""
        if not self._keys:
            return
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise ProxyError(
                401,
                _MISSING,
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        if not self.matches(token):
            raise ProxyError(
                401,
                _WRONG,
                code="invalid_api_key",
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
