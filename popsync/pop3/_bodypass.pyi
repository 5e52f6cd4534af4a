# The optional C accelerator (_bodypass.c); popsync.pop3.reader._scan_python
# is its reference and documents the result.
def scan(
    buf: bytearray, at_line_start: bool, crlf_to_lf: bool, partial_flush: int, /
) -> tuple[bytes, int, int, bool, bool]: ...
