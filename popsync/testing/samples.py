"""Sample mail for ``popsync demo``, tests and benchmarks.

* :func:`sample_messages` returns a handful of realistic RFC 5322 messages
  with LF line endings, chosen to exercise the paths that break clients:
  dot-stuffing (lines starting with ``.``, a line that is only ``.``), 8-bit
  UTF-8 bodies, a multipart message with a base64 attachment, and a long
  folded header.  Content is fixed (dates, Message-IDs), so two calls give
  equal bytes.
* :func:`generate_messages` yields *count* distinct messages of roughly
  *size* bytes each, deterministically from *seed*.  It slices a precomputed
  pool of body lines instead of building text per message, so 50,000
  messages take well under a second.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

__all__ = ["generate_messages", "sample_messages"]

_ATTACHMENT = (
    b"date,amount,currency\n2024-03-01,12.50,EUR\n2024-03-02,7.25,EUR\n2024-03-05,99.00,EUR\n"
)

_PLAIN = b"""\
Return-Path: <alice@example.org>
Received: from mail.example.org (mail.example.org [192.0.2.10])
\tby pop.example.net with ESMTPS id 4F2A1C0042
\tfor <bob@example.net>; Mon, 04 Mar 2024 09:15:02 +0000
From: Alice Example <alice@example.org>
To: Bob Example <bob@example.net>
Subject: Lunch on Thursday?
Date: Mon, 04 Mar 2024 09:15:00 +0000
Message-ID: <20240304091500.1@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hi Bob,

are you free for lunch on Thursday? The new place near the station
opens at noon.

Alice
"""

_DOTS = b"""\
From: Build Bot <ci@example.org>
To: dev@example.net
Subject: Nightly build log (dot-stuffing sample)
Date: Mon, 04 Mar 2024 02:00:00 +0000
Message-ID: <20240304020000.build.77@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

The log below has lines that start with a dot, and one that is only a dot.
.profile sourced
..hidden directory scanned
.
. leading dot and a space
...three dots
End of log. A line ending with a dot.
"""

_UTF8 = """\
From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.de>
To: bob@example.net
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=
Date: Tue, 05 Mar 2024 18:42:10 +0100
Message-ID: <20240305174210.utf8@example.de>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Hallo Bob,

viele Grüße aus Köln! Das Café am Dom hat wieder geöffnet.
Naïve résumé, façade, smørrebrød — and 日本語 and emoji: ☕.

Jürgen
""".encode()

_MULTIPART = (
    b"""\
From: Accounts <accounts@example.com>
To: bob@example.net
Subject: Your March statement
Date: Wed, 06 Mar 2024 07:30:00 +0000
Message-ID: <20240306073000.stmt@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_popsync_sample_boundary"

This is a multi-part message in MIME format.

--=_popsync_sample_boundary
Content-Type: text/plain; charset=us-ascii

Your statement for March is attached.

--=_popsync_sample_boundary
Content-Type: text/csv; name="statement.csv"
Content-Disposition: attachment; filename="statement.csv"
Content-Transfer-Encoding: base64

"""
    + base64.encodebytes(_ATTACHMENT)
    + b"""
--=_popsync_sample_boundary--
"""
)

_REFERENCES = b"".join(
    b"\n <2024030%d%02d0000.thread%d@lists.example.org>" % (1 + i % 5, i, i) for i in range(40)
)

_LONG_HEADER = (
    b"""\
From: Mailing List <list@lists.example.org>
To: bob@example.net
Subject: Re: Re: Re: [discuss] A very long thread about whether long subject lines
 should be folded, and how clients cope with headers that span many lines
Date: Thu, 07 Mar 2024 12:00:00 +0000
Message-ID: <20240307120000.reply@lists.example.org>
In-Reply-To: <20240305390000.thread39@lists.example.org>
References:"""
    + _REFERENCES
    + b"""
List-Id: Discussion <discuss.lists.example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

The header of this message is long (a folded References field of forty ids).
"""
)

_ALTERNATIVE = b"""\
From: Newsletter <news@example.com>
To: bob@example.net
Subject: March news
Date: Fri, 08 Mar 2024 10:00:00 +0000
Message-ID: <20240308100000.news@example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt-boundary-42"

--alt-boundary-42
Content-Type: text/plain; charset=us-ascii

March news: the spring release is out.

--alt-boundary-42
Content-Type: text/html; charset=us-ascii

<html><body><p>March news: the <b>spring release</b> is out.</p></body></html>

--alt-boundary-42--
"""

_SHORT = b"""\
From: bob@example.net
To: bob@example.net
Subject: note to self
Date: Sat, 09 Mar 2024 23:59:59 +0000
Message-ID: <20240309235959.note@example.net>

Buy milk.
"""


def sample_messages() -> list[bytes]:
    """Seven fixed RFC 5322 messages with LF line endings (see the module docstring)."""
    return [_PLAIN, _DOTS, _UTF8, _MULTIPART, _LONG_HEADER, _ALTERNATIVE, _SHORT]


_WORDS = (
    b"alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    b"oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu mail "
    b"message server client ledger maildir sync poll fetch deliver"
).split()
_POOL_LINES = 512
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def _line_pool(seed: int) -> bytes:
    """Body text of _POOL_LINES lines; about one in nine starts with a dot, one is only '.'."""
    rng = random.Random(seed)  # noqa: S311 - deterministic test data, not a secret
    lines = []
    for i in range(_POOL_LINES):
        words = b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 11)))
        if i % 97 == 50:
            lines.append(b".")
        elif i % 9 == 4:
            lines.append(b"." + words)
        else:
            lines.append(words)
    return b"\n".join(lines) + b"\n"


def generate_messages(count: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """Yield *count* distinct messages of about *size* bytes (LF line endings).

    Deterministic for a given ``(count, size, seed)``; each message has a
    unique Message-ID and subject, and its body starts at a different line of
    a shared pool, so some bodies contain ``.``-led lines.  Raises ValueError
    if *count* or *size* is negative.
    """
    if count < 0 or size < 0:
        raise ValueError("count and size must not be negative")
    pool = _line_pool(seed)
    # Repeat the pool so any window of `size` bytes starting in its first copy fits.
    text = pool * (2 + size // len(pool))
    starts = [0, *(i + 1 for i in range(len(pool) - 1) if pool[i] == 0x0A)]
    for index in range(count):
        date = format_datetime(_EPOCH + timedelta(minutes=index))
        header = (
            b"From: Generator <gen%d@example.org>\n"
            b"To: bob@example.net\n"
            b"Subject: Generated message %d (seed %d)\n"
            b"Date: %s\n"
            b"Message-ID: <%d.%d.gen@example.org>\n"
            b"MIME-Version: 1.0\n"
            b"Content-Type: text/plain; charset=us-ascii\n"
            b"\n" % (seed, index, seed, date.encode("ascii"), seed, index)
        )
        start = starts[(index * 7) % len(starts)]
        want = max(size - len(header), 1)
        end = text.find(b"\n", start + want - 1) + 1
        yield header + text[start:end]
