"""Random differential runs of a built ``_bodypass`` against the Python reference.

Run as ``python -m tests.bodypass_fuzz MODULE_FILE [CASES]`` (by
tests/test_bodypass.py, under AddressSanitizer and UBSan): loads the
extension from MODULE_FILE, compares its ``scan`` with
``popsync.pop3.reader._scan_python`` on CASES random buffers, each placed
against a guard page on either side, and prints ``ok N`` or raises.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import random
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

from popsync.pop3.reader import ScanResult, _scan_python

#: What bodies are made of: every byte the reader treats specially, in the
#: combinations that matter (line ends, stuffed dots, terminators).
PIECES = (b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"a", b"xyz", b".\r\n", b"\n.\n", b"\r\n.")

PROT_NONE = 0
PROT_READ_WRITE = 3


def load(path: str) -> ModuleType:
    """Import the extension module built at *path*."""
    spec = importlib.util.spec_from_file_location("_bodypass", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_body(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))


class GuardedBuffer:
    """Three pages, the first and last inaccessible: a read just outside the
    middle page faults, so a scan that strays past either end of its input
    crashes instead of passing by luck."""

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 3 * self.page)
        anchor = ctypes.c_char.from_buffer(self.map)
        base = ctypes.addressof(anchor)
        del anchor  # the export would keep the map from closing
        libc = ctypes.CDLL(None, use_errno=True)
        for offset in (0, 2 * self.page):
            if libc.mprotect(ctypes.c_void_p(base + offset), self.page, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")

    def placements(self, data: bytes) -> Iterator[memoryview]:
        """*data* against the lower guard page, then against the upper one."""
        start, end = self.page, 2 * self.page
        for at in (start, end - len(data)):
            self.map[at : at + len(data)] = data
            yield memoryview(self.map)[at : at + len(data)]


def differences(scan: Callable[..., ScanResult], cases: int, seed: int) -> Iterator[str]:
    """Describe every case where *scan* and the Python reference disagree."""
    rng = random.Random(seed)
    guarded = GuardedBuffer()
    for _ in range(cases):
        data = random_body(rng)
        args = (rng.random() < 0.5, rng.random() < 0.8, rng.randrange(0, len(data) + 3))
        want = _scan_python(bytearray(data), *args)
        for view in guarded.placements(data):
            with view:
                got = scan(view, *args)
            if got != want:
                yield f"{data!r} {args}: C {got!r}, Python {want!r}"


def main() -> None:
    module = load(sys.argv[1])
    cases = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    for problem in differences(module.scan, cases, seed=1):
        raise SystemExit(f"differs: {problem}")
    print(f"ok {cases}")


if __name__ == "__main__":
    main()
