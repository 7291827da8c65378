"""Whether a path could be redirected by an unprivileged user (sshd's StrictModes).

Its own small module because the very first thing `mailtls deploy --local` does, before
it starts the target's validate_command from the targets file, is to check that
nobody but root could have changed that file (``configfile``).
"""

from __future__ import annotations

import os
import stat


def _prefixes(path: str) -> list[str]:
    parts = os.path.abspath(path).split(os.sep)[1:]
    return [os.sep] + [os.sep + os.path.join(*parts[: i + 1]) for i in range(len(parts)) if parts[i]]


def unsafe_component(path: str, trusted: frozenset[int] | None = None) -> str | None:
    """Why a path could be redirected by an unprivileged user, or None if it cannot.

    Like sshd's StrictModes, for both the path as written and its symlink-resolved
    form: every directory and symlink on the way must be owned by root (or us), and no
    directory may be writable by group or others -- except a sticky one (``/tmp``)
    whose next entry already exists and is owned by root, which nobody else can then
    rename or replace. A renewal user who can write a directory on the way could
    otherwise plant a symlink to ``/etc/shadow`` and have root overwrite it.
    """
    trusted = trusted if trusted is not None else frozenset({0, os.geteuid()})
    for chain in (_prefixes(path), _prefixes(os.path.realpath(path))):
        sticky_parent: str | None = None
        for p in chain:
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if sticky_parent:
                    return f"{sticky_parent} is writable by others and {p} does not exist yet"
                break
            except OSError as err:
                return f"cannot inspect {p}: {err.strerror or err}"
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
