"""The checkpoint directory: checked writable, and held by one run at a time (a lock file)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "jdeq.lock"


def writable_directory(path: str | Path) -> Path:
    """``path`` as an absolute Path, created if missing; ValueError naming it unless files can be created in it."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{path} is not a writable directory ({type(err).__name__}: {err.strerror or err})") from None
    return path


class DirectoryLockedError(RuntimeError):
    """Another live run holds the checkpoint directory's lock file."""


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/jdeq.lock`` (this process's pid and host) while the block runs; see :func:`_acquire`."""
    path = directory / LOCK_FILE
    _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _acquire(path: Path, replace_stale: bool = True) -> None:
    """Create the lock file ``path`` atomically (O_CREAT|O_EXCL). One left by a process that is no longer running
    on this host is stale: replaced, with a warning. Any other holder: DirectoryLockedError naming it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = None
        pid, host = (holder.get("pid"), holder.get("host")) if isinstance(holder, dict) else (None, None)
        owner = f"pid {pid} on {host}" if pid else "an unknown process (unreadable lock file)"
        if not (
            replace_stale and host == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _running(pid)
        ):
            raise DirectoryLockedError(
                f"{path.parent} is in use by another run ({owner}, lock file {path}); wait for it to end, or delete "
                "the lock file if no run uses the directory"
            ) from None
        warnings.warn(f"replacing the stale lock {path} of {owner}, which is no longer running", stacklevel=4)
        path.unlink(missing_ok=True)
        return _acquire(path, replace_stale=False)
    with os.fdopen(fd, "w") as file:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, file)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
