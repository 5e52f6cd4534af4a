"""The two body readers: the C accelerator and its pure-Python reference.

Tests that read bodies take ``body_reader_impl`` to run once with each.  The
accelerator is optional for users (an install without a C compiler uses the
Python reader), but not for the test run: when the environment variable
``CI`` is set, a missing accelerator fails the tests that need it instead of
skipping them, so CI really exercises the C code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from popsync.pop3 import reader


def require_body_accelerator() -> None:
    """Skip the calling test if the C body reader is not built; fail it when ``CI`` is set."""
    if reader._scan_c is not None:
        return
    message = "popsync.pop3._bodypass is not built (python setup.py build_ext --inplace)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI is set, so it must be built and tested", pytrace=False)
    pytest.skip(message)


@pytest.fixture(params=["python", "c"])
def body_reader_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the pure-Python body reader, then with the C accelerator."""
    if request.param == "c":
        require_body_accelerator()
    before = reader.accelerated()
    reader.use_accelerator(request.param == "c")
    try:
        yield request.param
    finally:
        reader.use_accelerator(before)
