"""popsync.identity as tables: when is a listed message the copy we hold?"""

from __future__ import annotations

import pytest

from popsync.identity import (
    HeaderHasher,
    Stored,
    Verdict,
    digest_headers,
    is_short,
    judge,
)

HEADERS = b"From: a@example.org\nSubject: hello\nMessage-ID: <1@example.org>\n\n"
BODY = b"line one\nline two\n"
MESSAGE = HEADERS + BODY
WIRE = len(MESSAGE) + MESSAGE.count(b"\n")  # CRLF on the wire
STATUS = b"Status: RO\nX-UID: 7\n"


def stored(**changes: object) -> Stored:
    digest = digest_headers(HEADERS)
    fields: dict[str, object] = {
        "server_size": WIRE,
        "wire_size": WIRE,
        "stored_size": len(MESSAGE),
        "stable_sha256": digest.stable,
        "mutable_octets": digest.mutable_octets,
        "mutable_lines": digest.mutable_lines,
    }
    fields.update(changes)
    return Stored(**fields)  # type: ignore[arg-type]


def with_status(headers: bytes) -> bytes:
    return headers[:-1] + STATUS + b"\n"


@pytest.mark.parametrize(
    ("received", "listed", "short"),
    [
        (1000, 1000, False),
        (1000, None, False),
        (1100, 1000, False),  # a server counting LF as one octet reports less
        (61, 98, False),  # small: left to the well-formed-reply rule
        (10_000, 12_000, True),
        (98_000, 100_000, False),  # within 5 %
        (90_000, 100_000, True),
    ],
)
def test_is_short(received: int, listed: int | None, short: bool) -> None:
    assert is_short(received, listed) is short


def test_mutable_fields_leave_the_stable_digest_alone() -> None:
    plain, rewritten = digest_headers(HEADERS), digest_headers(with_status(HEADERS))
    assert plain.stable == rewritten.stable and plain.full != rewritten.full
    assert (rewritten.mutable_octets, rewritten.mutable_lines) == (len(STATUS), 2)
    folded = digest_headers(b"X-Keywords: a\n b\n" + HEADERS)
    assert folded.stable == plain.stable and folded.mutable_lines == 2


def test_header_hasher_streams_in_any_chunking() -> None:
    for size in (1, 3, 7, len(MESSAGE)):
        hasher = HeaderHasher()
        for i in range(0, len(MESSAGE), size):
            hasher.feed(MESSAGE[i : i + size])
        assert hasher.digest() == digest_headers(HEADERS)


TOP_SAME = digest_headers(HEADERS)
TOP_STATUS = digest_headers(with_status(HEADERS))
TOP_OTHER = digest_headers(b"From: b@example.org\nSubject: other\n\n")
GROWN = WIRE + len(STATUS) + 2  # two more CRLF lines


@pytest.mark.parametrize(
    ("record", "listed", "top", "verdict"),
    [
        (stored(), WIRE, TOP_SAME, Verdict.SAME),
        (stored(), GROWN, TOP_STATUS, Verdict.SAME),  # mbox server, CRLF sizes
        (stored(), WIRE + len(STATUS), TOP_STATUS, Verdict.SAME),  # ... LF sizes
        (stored(), WIRE, None, Verdict.UNKNOWN),  # no TOP: never "go ahead"
        (stored(), WIRE + 5, TOP_SAME, Verdict.UNKNOWN),  # same headers, odd size
        (stored(), WIRE, TOP_OTHER, Verdict.UNKNOWN),  # rewritten per download?
        (stored(), WIRE + 50, TOP_OTHER, Verdict.OTHER),  # a reused unique-id
        (stored(wire_size=None), WIRE, TOP_SAME, Verdict.UNKNOWN),  # file gone
        # truncated copy (LF sizes cannot explain it either)
        (
            stored(wire_size=50_000, server_size=100_000, stored_size=49_000),
            100_000,
            TOP_SAME,
            Verdict.UNKNOWN,
        ),
        (
            stored(wire_size=len(MESSAGE), server_size=len(MESSAGE)),
            len(MESSAGE),
            TOP_SAME,
            Verdict.SAME,
        ),  # a server that counts LF sizes throughout
    ],
)
def test_judge(record: Stored, listed: int, top: object, verdict: Verdict) -> None:
    result = judge(record, listed, top)  # type: ignore[arg-type]
    assert result.verdict is verdict
    assert (result.reason == "") is (verdict is Verdict.SAME)
