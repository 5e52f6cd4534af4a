"""Numbers for people: the one way popsync shows a duration or a byte count.

The daemon's log, ``popsync status`` and the poll summary all use these, so
the same interval reads the same wherever it appears.  Pure functions; this
module imports nothing of popsync.
"""

from __future__ import annotations

__all__ = ["format_duration", "format_size"]


def format_duration(seconds: float) -> str:
    """*seconds* as ``0.25 s``, ``42 s``, ``5 min``, ``1.5 h`` or ``3.0 days``.

    Three significant digits below 10 s (grace periods and timeouts may be
    set that finely), whole seconds below 2 minutes, whole minutes below
    2 hours, tenths of an hour below 2 days, tenths of a day beyond.  A
    negative value (a clock that stepped back) shows as ``0 s``.
    """
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_size(n: float) -> str:
    """Bytes for people, in powers of 1000: ``812 B``, ``3.4 MB``, ``1.2 GB``."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
