"""The C body reader (popsync/pop3/_bodypass.c) against its Python reference.

Both readers get the same random bodies -- CR, LF, CRLF, dots, NULs and
terminators in every combination, split into random receives, with random
partial_flush -- and must hand out the same chunks and leave the same
buffer.  The C pass is also run against guard pages (a stray read crashes)
and, in the slow test, built with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popsync.pop3 import reader
from popsync.pop3.reader import BodyReader, _scan_python
from tests.bodypass_fixtures import require_body_accelerator
from tests.bodypass_fuzz import PIECES, differences

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "popsync" / "pop3" / "_bodypass.c"

bodies = st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=60).map(b"".join)


@pytest.fixture(autouse=True)
def _accelerator() -> None:
    require_body_accelerator()


def test_the_accelerator_is_what_bodies_are_read_with() -> None:
    assert reader.accelerated()


@settings(max_examples=1500, deadline=None)
@given(
    data=bodies,
    at_line_start=st.booleans(),
    crlf_to_lf=st.booleans(),
    partial_flush=st.integers(min_value=0, max_value=70),
)
def test_one_scan_matches_the_reference(
    data: bytes, at_line_start: bool, crlf_to_lf: bool, partial_flush: int
) -> None:
    buf = bytearray(data)
    assert reader._scan_c is not None
    got = reader._scan_c(buf, at_line_start, crlf_to_lf, partial_flush)
    assert buf == data  # scan reads; BodyReader.read consumes
    assert got == _scan_python(buf, at_line_start, crlf_to_lf, partial_flush)


@settings(max_examples=100, deadline=None)
@given(data=bodies.filter(bool), at_line_start=st.booleans(), partial_flush=st.integers(2, 70))
def test_a_large_scan_matches_the_reference(
    data: bytes, at_line_start: bool, partial_flush: int
) -> None:
    # 16 KiB or more: the C pass runs with the GIL released.
    buf = bytearray(data * (20_000 // len(data) + 1))
    assert reader._scan_c is not None
    got = reader._scan_c(buf, at_line_start, True, partial_flush)
    assert got == _scan_python(buf, at_line_start, True, partial_flush)


Chunks = list[tuple[bytes, int, bool]]


def read_in_pieces(
    wire: bytes, cuts: list[int], crlf_to_lf: bool, partial_flush: int
) -> tuple[Chunks, bytes, bool]:
    """Feed *wire* to a BodyReader in pieces, as the connection does.

    Returns the chunks handed out, what is left in the buffer, and the
    reader's line-start state.
    """
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    body = BodyReader(crlf_to_lf=crlf_to_lf, partial_flush=partial_flush)
    buf = bytearray()
    chunks: Chunks = []
    for piece in pieces:
        buf += piece
        while True:
            before = len(buf)
            chunk = body.read(buf)
            chunks.append((chunk.data, chunk.octets, chunk.done))
            if chunk.done:
                return chunks, bytes(buf), body.at_line_start
            if len(buf) == before:
                break
    return chunks, bytes(buf), body.at_line_start


@settings(max_examples=1500, deadline=None)
@given(
    wire=bodies,
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=8),
    crlf_to_lf=st.booleans(),
    partial_flush=st.integers(min_value=2, max_value=40),
)
def test_reading_in_pieces_matches_the_reference(
    wire: bytes, cuts: list[int], crlf_to_lf: bool, partial_flush: int
) -> None:
    results = {}
    for accelerated in (True, False):
        reader.use_accelerator(accelerated)
        try:
            results[accelerated] = read_in_pieces(wire, cuts, crlf_to_lf, partial_flush)
        finally:
            reader.use_accelerator(True)
    assert results[True] == results[False]


def test_a_stuffed_dot_after_a_receive_boundary_is_removed() -> None:
    # Each receive ends just before a line's stuffing dot: the reader must
    # remember it stopped at a line start.
    chunks, rest, _ = read_in_pieces(b"a\r\n..b\r\n..\r\n.\r\n+OK", [3, 9], True, 64)
    assert b"".join(data for data, _, _ in chunks) == b"a\n.b\n.\n"
    assert chunks[-1][2] and rest == b"+OK"


def test_no_read_strays_outside_the_buffer() -> None:
    # Every case twice: against a guard page below the buffer and one above.
    assert reader._scan_c is not None
    assert list(differences(reader._scan_c, 3000, seed=2)) == []


def test_a_negative_partial_flush_is_refused() -> None:
    assert reader._scan_c is not None
    with pytest.raises(ValueError, match="negative"):
        reader._scan_c(bytearray(b"x"), True, True, -1)


def test_a_partial_flush_too_short_to_hold_a_terminator_start_is_refused() -> None:
    # With partial_flush 1, ".\r" (the start of the terminating line) would be
    # streamed as a stuffed line before its LF arrived.
    with pytest.raises(ValueError, match="at least 2"):
        BodyReader(partial_flush=1)


def sanitizer_runtime() -> str | None:
    """The path of libasan.so for LD_PRELOAD, or None if gcc has none."""
    if shutil.which("gcc") is None:
        return None
    found = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.mark.slow
def test_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    libasan = sanitizer_runtime()
    if libasan is None:
        message = "gcc with libasan is needed to build the sanitized _bodypass"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this test must run)")
        pytest.skip(message)
    module = tmp_path / f"_bodypass{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            "gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(module),
        ],
        check=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0",  # CPython itself never frees some memory
        "PYTHONMALLOC": "malloc",  # every object its own allocation, as ASan sees it
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.bodypass_fuzz", str(module), "30000"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 30000"
