"""Whether a path could be redirected by an unprivileged user (sshd's StrictModes).

Its own small module because the very first thing `mailtls deploy --local` does, before
it starts the target's validate_command from the targets file, is to check that
nobody but root could have changed that file (``configfile``).
"""

from __future__ import annotations

import os
import stat


def _prefixes(path: str) -> list[str]:
    out, here = [os.sep], ""
    for part in os.path.abspath(path).split(os.sep)[1:]:
        if part:
            here += os.sep + part
            out.append(here)
    return out


class Resolver:
    """``os.path.realpath`` and ``os.lstat`` for many paths in one go (a targets file of
    a thousand SNI names, a table naming two thousand files): each directory is resolved
    once, and a path below it costs one ``lstat``, not one per component. For one check;
    a fresh Resolver sees the file system anew."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}
        self._stats: dict[str, os.stat_result | OSError] = {}

    def realpath(self, path: str) -> str:
        path = os.path.abspath(path)
        parent, base = os.path.split(path)
        if not base:
            return path  # the root
        real_parent = self._dirs.get(parent)
        if real_parent is None:  # each directory on the way resolved once, from its own parent
            real_parent = self._dirs[parent] = self.realpath(parent)
        joined = os.path.join(real_parent, base)
        st = self.lstat(joined)
        if not isinstance(st, OSError) and stat.S_ISLNK(st.st_mode):
            return os.path.realpath(joined)
        return joined  # as realpath says: a missing leaf is the joined path

    def lstat(self, path: str) -> os.stat_result | OSError:
        got = self._stats.get(path)
        if got is None:
            try:
                got = os.lstat(path)
            except OSError as err:
                got = err
            self._stats[path] = got
        return got


def unsafe_component(path: str, trusted: frozenset[int] | None = None,
                     resolver: Resolver | None = None) -> str | None:
    """Why a path could be redirected by an unprivileged user, or None if it cannot.

    Like sshd's StrictModes, for both the path as written and its symlink-resolved
    form: every directory and symlink on the way must be owned by root (or us), and no
    directory may be writable by group or others -- except a sticky one (``/tmp``)
    whose next entry already exists and is owned by root, which nobody else can then
    rename or replace. A renewal user who can write a directory on the way could
    otherwise plant a symlink to ``/etc/shadow`` and have root overwrite it.
    """
    trusted = trusted if trusted is not None else frozenset({0, os.geteuid()})
    r = resolver or Resolver()
    for chain in (_prefixes(path), _prefixes(r.realpath(path))):
        sticky_parent: str | None = None
        for p in chain:
            st = r.lstat(p)
            if isinstance(st, FileNotFoundError):
                if sticky_parent:
                    return f"{sticky_parent} is writable by others and {p} does not exist yet"
                break
            if isinstance(st, OSError):
                return f"cannot inspect {p}: {st.strerror or st}"
            is_dir, is_link = stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode)
            if (is_dir or is_link) and st.st_uid not in trusted:
                return f"{p} is owned by uid {st.st_uid}, not root"
            if sticky_parent and st.st_uid not in trusted:
                return f"{p} in the world-writable {sticky_parent} is owned by uid {st.st_uid}"
            sticky_parent = None
            if is_dir and st.st_mode & 0o022:
                if not st.st_mode & stat.S_ISVTX:
                    who = "others" if st.st_mode & 0o002 else "its group"
                    return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
                sticky_parent = p
    return None
