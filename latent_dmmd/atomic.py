"""Files that are either whole or absent: files and folders written aside and renamed into place,
folders fsynced first; a check that a checkpoint folder is complete; a lock that keeps a second run out of a folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` and the folders themselves to disk (a rename is only as
    durable as the data it points at: after a power cut an unsynced file can read as 0 bytes)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file_atomically(path: str, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: ``path`` is
    the old file or the new one, never a torn one. The file gets the permissions a plain ``open``
    would give (``mkstemp`` makes 0600); on any error the temporary file is removed."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def replace_folder(final: str) -> Iterator[str]:
    """Yield a temporary sibling of ``final`` to write into; when the block ends without an error,
    it is fsynced and swapped in for ``final``. On any error ``final`` is untouched (the previous
    export stays loadable) and the temporary folder is removed.

    The swap is two renames (old aside, new into place); a crash between them leaves the previous
    folder complete as ``.old-<name>`` beside the new complete ``.tmp-<name>``.
    """
    parent, name = os.path.split(os.path.abspath(final))
    tmp, old = os.path.join(parent, f".tmp-{name}"), os.path.join(parent, f".old-{name}")
    for stale in (tmp, old):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = False
    try:
        if os.path.isdir(final):
            os.replace(final, old)
            moved = True
        os.replace(tmp, final)
    except OSError:  # e.g. EBUSY on a mount point: put the previous folder back, leave nothing behind
        if moved and not os.path.exists(final):
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def incomplete_files(folder: str) -> list[str]:
    """Files of a checkpoint folder that cannot be whole: empty files, safetensors whose header does
    not parse, and torch.save archives (zip) whose directory is unreadable. Empty list: complete."""
    from safetensors import safe_open

    bad = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) == 0:
                bad.append(path)
            elif name.endswith(".safetensors"):
                try:
                    with safe_open(path, "pt") as st:
                        list(st.keys())
                except Exception:  # noqa: BLE001 - any failure to parse means the file is not whole
                    bad.append(path)
            elif name.endswith((".bin", ".pt", ".pth")) and not _zip_is_whole(path):
                bad.append(path)
    return bad


def _zip_is_whole(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False  # torch.save has written zip archives since torch 1.6
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


class RunLock:
    """``<folder>/.lock`` holding the owner's pid, created exclusively: a second run into the same
    folder is refused while the first one lives; a lock left by a dead process is taken over."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self.held = False

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise RuntimeError(
                        f"another run (pid {owner}) is writing to {os.path.dirname(self.path)}; wait for it or choose "
                        f"another --output_dir"
                    ) from None
                logger.warning("removing a stale lock %s (pid %s is gone)", self.path, owner)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def _owner(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True
