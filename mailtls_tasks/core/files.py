"""Atomic, durable, symlink-aware file replacement.

The rules every write here follows, because a half-written key file means lost mail:

* new bytes go to a temp file **in the destination's own directory** (so the final
  ``rename`` is on one filesystem and therefore atomic), created with ``O_EXCL`` and
  its final mode from the first byte (a key is never world-readable, not even for a
  moment), then fsynced;
* ``os.replace`` puts it in place, then the directory is fsynced so the rename
  itself survives a power cut;
* a symlinked path is resolved and the *real* file replaced, so the link (often
  shared by Postfix and Dovecot, or managed by certbot's ``live/`` layout) survives.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class FileState:
    """What a file is now: enough to restore it exactly."""

    path: str
    exists: bool
    sha256: str | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None


def private_dirs(root: str, path: str) -> None:
    """Create ``path`` and every missing directory from ``root`` down to it, each 0700
    from the first moment (``os.makedirs`` gives the ones it creates on the way the
    default mode: 0755 under the usual umask). ``root``'s own parents get the default."""
    if os.path.isdir(path):
        return
    root = os.path.abspath(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    d = root
    for part in [".", *os.path.relpath(path, root).split(os.sep)]:
        d = os.path.normpath(os.path.join(d, part))
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


def real_path(path: str) -> str:
    """The file a write must replace: symlinks resolved, so the link itself survives."""
    return os.path.realpath(path)


def inspect(path: str) -> tuple[FileState, bytes | None]:
    """(state, bytes) of ``path`` without following a dangling link into an error."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return FileState(path=path, exists=False), None
    return (
        FileState(
            path=path,
            exists=True,
            sha256=hashlib.sha256(data).hexdigest(),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
        ),
        data,
    )


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str, data: bytes, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Create ``path`` (must not exist) with ``mode`` from the start, write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode & 0o600)
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        # fchmod after fchown: chown clears setuid bits, and the umask may have
        # narrowed the mode given to open(); the final mode must be exact.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)


def write_scratch(path: str, data: bytes) -> None:
    """A private file (0600) for a moment's use -- OpenSSL reads it for a handshake,
    then it is removed: not fsynced, since nothing depends on it surviving a crash
    (it lives in the deploy's own journal directory, which the deploy removes)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def adopt(path: str, mode: int, uid: int | None = None, gid: int | None = None) -> str:
    """Give a file another program wrote (postmap's table) its final owner and mode,
    fsync it and its directory; returns its SHA-256 (read once, in place)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, mode)  # after fchown, which clears setuid bits
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    return digest.hexdigest()


def replace(src: str, dest: str) -> None:
    """Atomically rename ``src`` over ``dest`` and make the rename durable."""
    os.replace(src, dest)
    fsync_dir(os.path.dirname(dest) or ".")


def remove(path: str) -> bool:
    """Unlink durably; True if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path) or ".")
    return True


def atomic_write(path: str, data: bytes, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Write ``path`` as a whole: temp beside it, fsync, rename, fsync dir."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    write_new(tmp, data, mode, uid, gid)
    replace(tmp, path)


def resolve_owner(owner: str | None, group: str | None) -> tuple[int | None, int | None]:
    """Names (or numeric ids) from the config -> ids; None keeps what is there."""
    uid = gid = None
    if owner:
        uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid
