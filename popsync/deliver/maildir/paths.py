"""Opening a Maildir directory as root: one component at a time, root's symlinks only.

Run as root, popsync must not let a user steer its deliveries (and the
directories it creates) through a symlink into a place only root may write.
The kernel's own path resolution follows every symlink, so the path is
walked here instead: each component is opened with
``O_DIRECTORY|O_NOFOLLOW`` relative to the descriptor of the one before
(openat(2)), so nothing can be swapped between a check and its use. A
symlink is followed -- its target walked the same way -- only if root owns
it; another user's symlink is refused with :class:`UnsafeMaildir`. Together
with the Maildir's ownership check, root delivers only into root's own
Maildirs.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from popsync.deliver.maildir.errors import MaildirUnusable, UnsafeMaildir, os_error
from popsync.deliver.maildir.files import DIR_FLAGS, DIR_MODE
from popsync.errors import DeliveryError

__all__ = ["open_as_root"]

#: As path resolution in the kernel (MAXSYMLINKS, path_resolution(7)).
_MAX_SYMLINKS = 40


def open_as_root(path: Path, create: bool) -> int:
    """Open the Maildir directory *path* as root, following only root's symlinks.

    With *create*, a missing component is made (mode 0700) on the way. The
    caller closes the returned directory descriptor.

    Raises UnsafeMaildir for another user's symlink; DeliveryError if a
    component is missing (without *create*), is not a directory, or there
    are more than 40 symlinks.
    """
    text = os.fspath(path)
    fd = os.open("/" if os.path.isabs(text) else ".", DIR_FLAGS)
    todo = _components(text)
    walked = "/" if os.path.isabs(text) else ""
    followed = 0
    try:
        while todo:
            part = todo.pop()
            step = _step(fd, part, os.path.join(walked, part), path, create)
            if isinstance(step, int):
                os.close(fd)
                fd, walked = step, os.path.join(walked, part)
                continue
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise DeliveryError(f"Maildir {path}: too many levels of symbolic links")
            todo.extend(_components(step))
            if os.path.isabs(step):
                os.close(fd)
                fd, walked = os.open("/", DIR_FLAGS), "/"
    except BaseException:
        os.close(fd)
        raise
    return fd


def _components(text: str) -> list[str]:
    """The names of a path, last first (a stack to pop from)."""
    return [part for part in reversed(text.split("/")) if part not in ("", ".")]


def _step(dir_fd: int, part: str, shown: str, path: Path, create: bool) -> int | str:
    """Open directory *part* under *dir_fd*: its descriptor, or a root symlink's target."""
    for _ in range(2):
        try:
            return os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            if not create:
                raise DeliveryError(f"Maildir {path} does not exist") from exc
            try:
                os.mkdir(part, DIR_MODE, dir_fd=dir_fd)
            except FileExistsError:
                pass  # made meanwhile: look again
            except OSError as err:
                raise os_error("create", shown, err) from err
        except OSError as exc:
            # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ELOOP or ENOTDIR.
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise os_error("open Maildir", shown, exc) from exc
            return _root_symlink_target(dir_fd, part, shown, path)
    raise DeliveryError(f"Maildir {path}: {shown} keeps changing; refusing")


def _root_symlink_target(dir_fd: int, part: str, shown: str, path: Path) -> str:
    """The target of symlink *part* if root owns it; UnsafeMaildir if another user does.

    On Linux the link itself is opened (``O_PATH|O_NOFOLLOW``), so its owner
    and its target are read from the same inode; elsewhere lstat and
    readlink are two look-ups.
    """
    try:
        if hasattr(os, "O_PATH"):
            link_fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                st = os.fstat(link_fd)
                target = os.readlink("", dir_fd=link_fd) if stat.S_ISLNK(st.st_mode) else ""
            finally:
                os.close(link_fd)
        else:  # pragma: no cover - not Linux
            st = os.lstat(part, dir_fd=dir_fd)
            target = os.readlink(part, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
    except OSError as exc:
        raise os_error("open Maildir", shown, exc) from exc
    where = f"Maildir {path}" if shown == os.fspath(path) else f"Maildir {path}: {shown}"
    if not stat.S_ISLNK(st.st_mode):
        raise MaildirUnusable(f"{where} is not a directory")
    if st.st_uid != 0:
        raise UnsafeMaildir(
            f"{where} is a symlink owned by uid {st.st_uid}, and popsync "
            "running as root follows only root's symlinks; run popsync as the Maildir's "
            "owner, or name the real directory"
        )
    return target
