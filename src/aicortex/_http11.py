"""HTTP/1.1 framing as pure functions: the request head, the response head, and the
three ways a response body can end (a length, chunks, or the connection closing).

The decoders work on a buffer and an offset so that one network read holding many
small chunks (Ollama flushes one chunk per token) is decoded in a single pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "MAX_HEAD",
    "BodyDecoder",
    "ChunkedBody",
    "CloseBody",
    "LengthBody",
    "ProtocolError",
    "ResponseHead",
    "closes",
    "parse_head",
    "request_head",
]

MAX_HEAD = 64 * 1024
"""The largest response head accepted, in bytes."""

_MAX_LINE = 4096  # a chunk-size or trailer line
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?")
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?")  # extensions ignored
_UNSAFE_VALUE = re.compile(rb"[\x00\r\n]")
_NO_BODY_STATUS = frozenset({204, 304})


class ProtocolError(Exception):
    """The peer (or the request being sent) broke HTTP/1.1 framing."""


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes of a request line and its header fields, ending in the blank line.

    Raises :class:`ProtocolError` for anything that could split the head: a method
    or header name that is not a token, or CR, LF or NUL in the target or a value.
    """
    if not _TOKEN.fullmatch(method):
        raise ProtocolError(f"invalid HTTP method {method!r}")
    if not target or b" " in target or _UNSAFE_VALUE.search(target):
        raise ProtocolError(f"invalid request target {target!r}")
    names = [name for name, _ in headers]
    values = [value for _, value in headers]
    # One pass over all names and one over all values (a pass per field costs more
    # than building the head); the field at fault is looked for only on failure.
    if names and (
        not all(names)
        or not _TOKEN.fullmatch(b"".join(names))
        or _UNSAFE_VALUE.search(b"".join(values))
    ):
        for name, value in headers:
            if not _TOKEN.fullmatch(name):
                raise ProtocolError(f"invalid header name {name!r}")
            if _UNSAFE_VALUE.search(value):
                raise ProtocolError(f"invalid value for header {name.decode('latin-1')!r}")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def closes(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether request ``headers`` ask to close the connection after the response."""
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection" and b"close" in value.lower():
            return True
    return False


@dataclass(slots=True)
class ResponseHead:
    """A parsed status line and header fields."""

    http_version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list[tuple[bytes, bytes]])

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower case), comma-separated lists split."""
        found: list[bytes] = []
        for key, value in self.headers:
            if key.lower() == name:
                found += (v.strip() for v in value.split(b",") if v.strip())
        return found

    @property
    def keep_alive(self) -> bool:
        """Whether the server lets the connection carry another request."""
        tokens = {v.lower() for v in self.values(b"connection")}
        if self.http_version == b"HTTP/1.1":
            return b"close" not in tokens
        return b"keep-alive" in tokens

    def body(self, method: bytes) -> BodyDecoder | None:
        """The decoder for this response's body; None when it has none."""
        if method == b"HEAD" or self.status < 200 or self.status in _NO_BODY_STATUS:
            return None
        encodings = [v.lower() for v in self.values(b"transfer-encoding")]
        if encodings:
            if encodings[-1] == b"chunked":
                return ChunkedBody()
            return CloseBody()  # RFC 9112 6.3: read until the connection closes
        lengths = set(self.values(b"content-length"))
        if not lengths:
            return CloseBody()
        if len(lengths) > 1:
            raise ProtocolError("conflicting Content-Length headers")
        (length,) = lengths
        if not length.isdigit() or len(length) > 18:
            raise ProtocolError(f"invalid Content-Length {length!r}")
        return LengthBody(int(length))


def parse_head(data: bytes) -> ResponseHead:
    """Parse a response head: the bytes before the blank line that ends it."""
    lines = data.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f"invalid status line {lines[0][:80]!r}")
    head = ResponseHead(b"HTTP/1." + match[1], int(match[2]), match[3] or b"")
    headers = head.headers
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # also rejects obsolete line folding (a line starting with whitespace)
            raise ProtocolError(f"invalid header line {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return head


class BodyDecoder:
    """Turns raw bytes into body bytes; :meth:`take` consumes what is complete."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def take(self, buffer: bytes, pos: int) -> tuple[bytes, int]:
        """Decode from ``buffer[pos:]``: the body bytes found and the new offset."""
        raise NotImplementedError

    def eof(self) -> None:
        """The peer closed the connection: fine only if the body was complete."""
        if not self.done:
            raise ProtocolError(self._incomplete())

    def _incomplete(self) -> str:
        return "peer closed connection without sending complete message body"

    @property
    def reusable(self) -> bool:
        """Whether the connection can carry another request once this body is done."""
        return True


class LengthBody(BodyDecoder):
    """A body of ``Content-Length`` bytes."""

    __slots__ = ("expected", "left")

    def __init__(self, length: int) -> None:
        super().__init__()
        self.expected = length
        self.left = length
        self.done = length == 0

    def take(self, buffer: bytes, pos: int) -> tuple[bytes, int]:
        end = min(len(buffer), pos + self.left)
        data = buffer[pos:end]
        self.left -= end - pos
        self.done = self.left == 0
        return data, end

    def _incomplete(self) -> str:
        received = self.expected - self.left
        return (
            "peer closed connection without sending complete message body: "
            f"received {received} bytes, expected {self.expected}"
        )


class CloseBody(BodyDecoder):
    """A body that ends when the server closes the connection."""

    __slots__ = ()

    def take(self, buffer: bytes, pos: int) -> tuple[bytes, int]:
        return buffer[pos:], len(buffer)

    def eof(self) -> None:
        self.done = True

    @property
    def reusable(self) -> bool:
        return False


# ChunkedBody states
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedBody(BodyDecoder):
    """A ``Transfer-Encoding: chunked`` body; every complete chunk in the buffer is
    decoded in one call and returned joined."""

    __slots__ = ("_left", "_state")

    def __init__(self) -> None:
        super().__init__()
        self._state = _SIZE
        self._left = 0

    def take(self, buffer: bytes, pos: int) -> tuple[bytes, int]:
        out: list[bytes] = []
        end = len(buffer)
        state = self._state
        left = self._left
        while not self.done:
            if state == _DATA:
                if pos + left > end:
                    out.append(buffer[pos:])
                    left -= end - pos
                    pos = end
                    break
                out.append(buffer[pos : pos + left])
                pos += left
                state = _DATA_END
            if state == _DATA_END:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data is not followed by CRLF")
                pos += 2
                state = _SIZE
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > _MAX_LINE:
                    raise ProtocolError("chunk-size or trailer line too long")
                break
            line = buffer[pos:line_end]
            pos = line_end + 2
            if state == _TRAILER:
                if not line:
                    self.done = True
                continue
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
            left = int(size[1], 16)
            state = _DATA if left else _TRAILER
        self._state = state
        self._left = left
        return b"".join(out), pos

    def _incomplete(self) -> str:
        return (
            "peer closed connection without sending complete message body: incomplete chunked read"
        )
