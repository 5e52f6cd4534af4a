"""Tests for popsync.textfmt: the one formatter of durations and sizes."""

from __future__ import annotations

import pytest

from popsync.textfmt import format_duration, format_size


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3.0, "0 s"),  # a clock that stepped back
        (0.0, "0 s"),
        (0.25, "0.25 s"),
        (1.0, "1 s"),
        (1.5, "1.5 s"),
        (9.99, "9.99 s"),
        (42.4, "42 s"),
        (100.0, "100 s"),
        (119.0, "119 s"),
        (120.0, "2 min"),
        (300.0, "5 min"),
        (3600.0, "60 min"),
        (7199.0, "120 min"),
        (7200.0, "2.0 h"),
        (5400.0 * 10, "15.0 h"),
        (2 * 86400.0 - 1, "48.0 h"),
        (2 * 86400.0, "2.0 days"),
        (366 * 86400.0, "366.0 days"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (812, "812 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (3_400_000, "3.4 MB"),
        (1_200_000_000, "1.2 GB"),
        (5_000_000_000_000, "5000.0 GB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
