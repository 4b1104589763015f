"""Atomic file output: write under a temporary name in the target's folder, rename into place when complete.

Every writer in the project goes through here, so a failed or interrupted write never leaves a half-written trace,
report or result behind, and every output gets the same (umask-based, shareable) file mode. A temporary name carries
its writer's host and process id; a writer killed outright (no clean-up runs) leaves its temporary file, and the
next write of the same output on that host deletes it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file stands where a folder of the path must be; say so, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", exc.filename) from None


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_")


def _owner() -> str:
    """Who writes a temporary file: host and process, so a later writer can tell a dead writer's leftovers from a
    live writer's work in progress."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clear_leftovers(path: Path, suffix: str) -> None:
    """Delete the temporary files (or folders) of earlier writers of ``path`` on this host whose process has died
    (killed mid-write: SIGKILL runs no clean-up). Another host's, or a live process's, are left alone."""
    import shutil

    host = _host()
    try:
        leftovers = list(path.parent.glob(f".{path.name}.{host}-*{suffix}"))
    except OSError:
        return
    for tmp in leftovers:
        pid = tmp.name[len(f".{path.name}.{host}-"):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``, on an error it is deleted."""
    path = Path(path)
    if path.is_dir():  # else the rename at the end fails, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a folder; the output needs a file name", str(path))
    _make_folder(path.parent)
    _clear_leftovers(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600 files; outputs are data to share, so give them the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def check_folder_target(path: str | os.PathLike) -> Path:
    """``path`` as an output folder ``atomic_folder`` can replace: absent, or a folder (a command calls this
    before its work, so a wrong ``--out`` costs nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: {str(path)!r} exists and is not a folder")
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on a clean exit it replaces ``path`` whole (its earlier files
    included), on an error it is deleted and ``path`` is left as it was. Concurrent writers to one ``path`` each
    fill their own folder, so the result is one writer's files, never a mix."""
    import shutil

    path = check_folder_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(path, ".tmp")
        _clear_leftovers(path, ".old")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise ValueError(f"--out: cannot create a folder beside {str(path)!r} ({exc.strerror or exc})") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; outputs are shared data
        for _ in range(100):  # another writer may move a folder into place between our two renames
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".old", dir=path.parent))
                try:
                    os.replace(path, old / "x")
                except FileNotFoundError:
                    pass
            try:
                os.rename(tmp, path)
            except OSError:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                continue
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            break
        else:
            raise ValueError(f"--out: could not move the new results into {str(path)!r} (other writers kept "
                             f"replacing it)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
