"""Which file system a Maildir is on, to warn about network file systems.

Maildir delivery works on NFS only with care: link(2) notes that on NFS a
link() may report failure although it worked, ``O_EXCL`` needs NFSv3 or
later (open(2)), and every host delivering into the same Maildir needs its
own host name in the file names. The Maildir copes with the first two; the
sync warns about the third. Detection is best effort and Linux only: it
reads /proc/self/mountinfo, else /proc/mounts (proc(5)).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "NETWORK_FS_TYPES",
    "filesystem_type",
    "fs_type_from_mountinfo",
    "fs_type_from_mounts",
]

#: File systems on which Maildir delivery works only with care (see above).
NETWORK_FS_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs"}
)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def filesystem_type(dir_fd: int, path: Path) -> str | None:
    """The file system type (e.g. ``ext4``, ``nfs4``) of directory *dir_fd*; None if unknown.

    /proc/self/mountinfo is matched by the device of *dir_fd*; the fallback,
    /proc/mounts, by the longest mount point containing the resolved *path*
    (the same directory, named). Never raises.
    """
    try:
        dev = os.fstat(dir_fd).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            found = fs_type_from_mountinfo(fh.read(), dev)
        if found is not None:
            return found
    except OSError:
        pass
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            return fs_type_from_mounts(fh.read(), os.path.realpath(path))
    except OSError:
        return None


def fs_type_from_mountinfo(text: str, dev: int) -> str | None:
    """File system type of the mount whose device is *dev*, from /proc/self/mountinfo text.

    Matching by device number (not by path prefix) is immune to symlinks and
    bind mounts. The last match wins, as later mounts shadow earlier ones.
    """
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found: str | None = None
    for line in text.splitlines():
        fields = line.split()
        # id parent major:minor root mountpoint options [optional...] - fstype source super
        if len(fields) < 8 or fields[2] != wanted or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if sep + 1 < len(fields):
            found = fields[sep + 1]
    return found


def fs_type_from_mounts(text: str, path: str) -> str | None:
    """File system type from /proc/mounts text by longest mount-point prefix of *path*.

    Mount points there escape space, tab, newline and backslash as octal
    (``\\040``); they are unescaped before comparing.
    """
    best: tuple[int, str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None
