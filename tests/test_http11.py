"""HTTP/1.1 framing: request heads, response heads and the three kinds of body."""

from __future__ import annotations

import pytest

from aicortex._http11 import (
    ChunkedBody,
    CloseBody,
    LengthBody,
    ProtocolError,
    ResponseHead,
    closes,
    parse_head,
    request_head,
)


def test_request_head_lists_the_request_line_and_every_header() -> None:
    """The head is the request line, one line per header, then a blank line."""
    head = request_head(b"POST", b"/api/chat?x=1", [(b"Host", b"h:1"), (b"Accept", b"*/*")])
    assert head == b"POST /api/chat?x=1 HTTP/1.1\r\nHost: h:1\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET X", b"/", []),
        (b"", b"/", []),
        (b"GET", b"/a b", []),
        (b"GET", b"/\r\nX: y", []),
        (b"GET", b"", []),
        (b"GET", b"/", [(b"X-Evil", b"a\r\nInjected: yes")]),
        (b"GET", b"/", [(b"X-Evil", b"a\nb")]),
        (b"GET", b"/", [(b"X-Nul", b"a\x00b")]),
        (b"GET", b"/", [(b"Bad Name", b"v")]),
        (b"GET", b"/", [(b"Bad:Name", b"v")]),
        (b"GET", b"/", [(b"Host", b"h"), (b"", b"v")]),
        (b"GET", b"/", [(b"Host", b"h"), (b"X-Evil", b"v\r\n"), (b"Accept", b"*/*")]),
    ],
)
def test_request_head_refuses_anything_that_could_split_it(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """CR, LF or NUL in a value, or a method or name that is not a token, is refused."""
    with pytest.raises(ProtocolError):
        request_head(method, target, headers)


def test_the_error_names_the_field_at_fault() -> None:
    """Among good fields, the bad one is named."""
    good = [(b"Host", b"h"), (b"Accept", b"*/*")]
    with pytest.raises(ProtocolError, match="value for header 'X-B'"):
        request_head(b"GET", b"/", [*good, (b"X-B", b"1\n2"), *good])
    with pytest.raises(ProtocolError, match="header name b'X B'"):
        request_head(b"GET", b"/", [*good, (b"X B", b"1"), *good])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        ([(b"Connection", b"keep-alive")], False),
        ([(b"Host", b"h"), (b"connection", b"Close")], True),
        ([(b"CONNECTION", b"upgrade, close")], True),
        ([(b"X-Connection", b"close")], False),
    ],
)
def test_closes_reads_the_connection_header(
    headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    """Only a Connection header listing ``close`` asks for the connection to end."""
    assert closes(headers) is expected


def test_parse_head_reads_status_reason_and_headers() -> None:
    """Values lose surrounding whitespace; names keep their case."""
    head = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Type:  text/plain \r\nX-A: 1")
    assert (head.http_version, head.status, head.reason) == (b"HTTP/1.1", 404, b"Not Found")
    assert head.headers == [(b"Content-Type", b"text/plain"), (b"X-A", b"1")]


def test_parse_head_accepts_http_1_0_and_a_missing_reason() -> None:
    """``HTTP/1.0 200`` with no reason phrase is valid."""
    head = parse_head(b"HTTP/1.0 200")
    assert (head.http_version, head.status, head.reason) == (b"HTTP/1.0", 200, b"")


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\nBad Name: v",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded",
    ],
)
def test_parse_head_refuses_what_is_not_http(data: bytes) -> None:
    """A bad status line, a header without a colon or name, or a folded line is refused."""
    with pytest.raises(ProtocolError):
        parse_head(data)


def _head(status: int = 200, *headers: tuple[bytes, bytes], version: bytes = b"HTTP/1.1"):
    return ResponseHead(version, status, b"", list(headers))


def test_body_framing_follows_rfc_9112() -> None:
    """Chunked wins over a length; a length gives a fixed body; neither reads to close."""
    assert isinstance(
        _head(200, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")).body(b"GET"),
        ChunkedBody,
    )
    assert isinstance(_head(200, (b"Transfer-Encoding", b"gzip")).body(b"GET"), CloseBody)
    length = _head(200, (b"Content-Length", b"12")).body(b"GET")
    assert isinstance(length, LengthBody)
    assert length.left == 12
    assert isinstance(_head(200).body(b"GET"), CloseBody)
    same = _head(200, (b"Content-Length", b"3"), (b"content-length", b"3")).body(b"GET")
    assert isinstance(same, LengthBody)


@pytest.mark.parametrize(("status", "method"), [(204, b"GET"), (304, b"GET"), (200, b"HEAD")])
def test_some_responses_have_no_body(status: int, method: bytes) -> None:
    """204, 304 and the answer to HEAD have no body, whatever their headers say."""
    assert _head(status, (b"Content-Length", b"10")).body(method) is None


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"3"), (b"Content-Length", b"4")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"1e3")],
        [(b"Content-Length", b"9" * 30)],
    ],
)
def test_bad_content_length_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    """Conflicting or non-numeric lengths are a protocol error, not a guess."""
    with pytest.raises(ProtocolError):
        _head(200, *headers).body(b"GET")


def test_keep_alive_depends_on_version_and_connection_header() -> None:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
    assert _head(200).keep_alive
    assert not _head(200, (b"Connection", b"close")).keep_alive
    assert not _head(200, (b"Connection", b"upgrade, Close")).keep_alive
    assert not _head(200, version=b"HTTP/1.0").keep_alive
    assert _head(200, (b"Connection", b"keep-alive"), version=b"HTTP/1.0").keep_alive


def _chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


def test_chunked_body_joins_every_complete_chunk_in_one_call() -> None:
    """Many small chunks in one buffer come back as one piece, and the end is seen."""
    data = _chunked(*(b"token%d " % i for i in range(100))) + b"NEXT"
    decoder = ChunkedBody()
    body, pos = decoder.take(data, 0)
    assert body == b"".join(b"token%d " % i for i in range(100))
    assert decoder.done
    assert data[pos:] == b"NEXT"  # the next response's bytes are left alone


def test_chunked_body_survives_every_split_point() -> None:
    """However the bytes are cut into reads, the same body comes out."""
    data = _chunked(b"hello", b"x" * 20, b"\r\n in data", trailer=b"X-T: 1\r\n")
    expected = b"hello" + b"x" * 20 + b"\r\n in data"
    for cut in range(len(data) + 1):
        for second in range(cut, len(data) + 1, 7):
            decoder = ChunkedBody()
            out: list[bytes] = []
            buffer, pos = b"", 0
            for part in (data[:cut], data[cut:second], data[second:]):
                buffer = buffer[pos:] + part
                body, pos = decoder.take(buffer, 0)
                out.append(body)
            assert b"".join(out) == expected, (cut, second)
            assert decoder.done


def test_chunked_body_ignores_extensions_and_reads_trailers() -> None:
    """``5;name=value`` is a 5-byte chunk; trailer fields are skipped."""
    data = b"5;ext=1\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-More: d\r\n\r\n"
    decoder = ChunkedBody()
    assert decoder.take(data, 0) == (b"hello", len(data))
    assert decoder.done


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\nhello\r\n",
        b"-5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"5\r\nhelloXX",
        b"1" * 5000,
        b"11111111111111111\r\n",
    ],
)
def test_chunked_body_refuses_broken_framing(data: bytes) -> None:
    """A bad size, data not followed by CRLF, or an endless size line is an error."""
    with pytest.raises(ProtocolError):
        ChunkedBody().take(data, 0)


def test_chunked_body_cut_before_its_end_is_an_error() -> None:
    """A connection closed before the last chunk means the body is incomplete."""
    decoder = ChunkedBody()
    decoder.take(b"5\r\nhel", 0)
    with pytest.raises(ProtocolError, match="incomplete chunked read"):
        decoder.eof()


def test_length_body_stops_at_its_length_and_knows_when_it_is_cut() -> None:
    """Bytes past the length are left; a close before the length is an error."""
    decoder = LengthBody(5)
    assert decoder.take(b"hel", 0) == (b"hel", 3)
    assert not decoder.done
    assert decoder.take(b"loEXTRA", 0) == (b"lo", 2)
    assert decoder.done
    cut = LengthBody(10)
    cut.take(b"abc", 0)
    with pytest.raises(ProtocolError, match="received 3 bytes, expected 10"):
        cut.eof()
    assert LengthBody(0).done


def test_close_body_ends_with_the_connection_which_is_then_not_reused() -> None:
    """A body without framing is whatever arrives until the peer closes."""
    decoder = CloseBody()
    assert decoder.take(b"abc", 1) == (b"bc", 3)
    assert not decoder.done
    decoder.eof()
    assert decoder.done
    assert not decoder.reusable
    assert LengthBody(1).reusable
    assert ChunkedBody().reusable
