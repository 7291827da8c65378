"""A target served by SNI from a Postfix table: which entries of the table are its
own, and the table built beside the live one from the staged files.

The steps use it: stage plans the table (``plan``) and builds it (``build_beside``),
validate compares the built table with the live one (``steps.validate``), commit and
rollback rename it like any other file of the deploy. Why beside: ``postmap -F``
stores the file contents in the table, rewrites an existing one in place and copies
its source's mode (``daemons.postfix_sni``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..daemons.postfix_sni import SniEntry, SniMap, build, dump, format_source, key_for_name, parse_source
from ..errors import ConfigError, Rejected
from . import files, material
from .config import Target
from .journal import FileEntry
from .pathsafety import Resolver

MAP_ROLE = "sni_map"
TOOL_TIMEOUT = 60.0  # postmap -s of a table of thousands of names takes well under a second


class SniMismatch(Rejected):
    """The targets file and the SNI table disagree about a target's names."""

    reason = "sni_map"


@dataclass(frozen=True)
class MapPlan:
    """The table a target's entries live in, read at stage."""

    table: SniMap
    entries: tuple[SniEntry, ...]
    ours: frozenset[str]  # the keys whose files are the target's
    config_dir: str
    reals: tuple[tuple[str, ...], ...]  # each entry's files, symlinks resolved (``entries``' order)

    def with_ours(self, ours: frozenset[str]) -> MapPlan:
        return dataclasses.replace(self, ours=ours)

    @property
    def others(self) -> list[str]:
        return [e.key for e in self.entries if e.key not in self.ours]


def table_of(t: Target) -> SniMap | None:
    parse = t.daemon.sni_map
    if t.sni is None or parse is None:
        return None
    return parse(t.sni.map)


def compiled_real(t: Target) -> str | None:
    """The compiled table a deploy of ``t`` rewrites (symlinks resolved): a file it
    owns, like its own. None for a table read from its source, or no table."""
    table = table_of(t)
    return files.real_path(table.compiled) if table is not None and table.indexed else None


# a table's source as read: its entries, and each entry's files with symlinks resolved
TableRead = tuple[tuple[SniEntry, ...], tuple[tuple[str, ...], ...]]


def plan(t: Target, memo: dict[str, TableRead] | None = None) -> MapPlan | None:
    """Read the table's source; refuse (nothing touched) when its entries for the
    target's files are not exactly the target's ``names``. ``memo``: the sources a
    batch has read already (its members share a table)."""
    table = table_of(t)
    if table is None:
        return None
    read = memo.get(table.source) if memo is not None else None
    if read is None:
        read = _read(table)
        if memo is not None:
            memo[table.source] = read
    entries, entry_reals = read
    reals = {files.real_path(p) for _, p in t.files()}
    ours = {e.key for e, er in zip(entries, entry_reals, strict=True) if reals.intersection(er)}
    wanted = {key_for_name(n) for n in t.names}
    problems = []
    by_key = {e.key: e for e in entries}
    for key in sorted(wanted - ours):
        e = by_key.get(key)
        problems.append(f"{key} has no entry" if e is None else f"{key} names other files ({', '.join(e.files)})")
    for key in sorted(ours - wanted):
        problems.append(f"{key} names this target's files but is not in its names")
    if problems:
        raise SniMismatch(f"sni.map: {table.source} and target {t.name!r}'s names disagree: {'; '.join(problems)} "
                          "(a name served by SNI must have its entry, and its entries must be in names: "
                          "'*.example.net' is the entry '.example.net')")
    return MapPlan(table, entries, frozenset(ours), t.instance or t.daemon.default_instance, entry_reals)


def _read(table: SniMap) -> TableRead:
    try:
        with open(table.source, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as err:
        raise SniMismatch(f"sni.map: cannot read {table.source}: {err.strerror or err}") from None
    try:
        entries = parse_source(text, table.source)
    except ConfigError as err:
        raise SniMismatch(f"sni.map: {err}") from None
    resolver = Resolver()  # a table of a thousand names lists two thousand files in a few directories
    return tuple(entries), tuple(tuple(resolver.realpath(f) for f in e.files) for e in entries)


def keys_of(t: Target, p: MapPlan) -> set[str]:
    """The keys of the table ``p`` whose files are ``t``'s (another target of the same table)."""
    reals = {files.real_path(path) for _, path in t.files()}
    return {e.key for e, er in zip(p.entries, p.reals, strict=True) if reals.intersection(er)}


def holds_live(p: MapPlan) -> bool:
    """The live table holds, for each of the target's entries, the bytes of its files
    as they are now (a table never built, or built before they changed, does not)."""
    if not os.path.exists(p.table.compiled):
        return False
    live = dump(p.table, p.table.source, p.config_dir, TOOL_TIMEOUT)
    for e in p.entries:
        if e.key not in p.ours:
            continue
        value = live.get(e.key)
        data = [files.read_bytes(f) for f in e.files]
        if value is None or any(d is None for d in data):
            return False
        if material.pem_blocks(value) != material.pem_blocks(b"\n".join(d or b"" for d in data)):
            return False
    return True


def temp_source(table: SniMap, deploy_id: str) -> str:
    return os.path.join(os.path.dirname(table.source), f".{os.path.basename(table.source)}.mailtls-{deploy_id}.src")


def table_access(p: MapPlan, key_entry: FileEntry) -> tuple[int, int | None, int | None]:
    """The mode, owner and group the compiled table gets: it holds every key of the
    table, so no one may read it who cannot read each of them. The key files are each
    entry's first file (Postfix requires a value to begin with a key), the target's
    own as this deploy leaves it. Mode: what all of them allow; owner and group: theirs
    when they all share one, else this process's (root's), the group bits then dropped."""
    modes, uids, gids = {key_entry.new_mode}, {key_entry.new_uid}, {key_entry.new_gid}
    ours = {key_entry.real}
    for e, er in zip(p.entries, p.reals, strict=True):
        real = er[0]
        if e.key in p.ours or real in ours:
            continue
        ours.add(real)
        try:
            st = os.stat(real)
        except OSError:
            continue  # postmap will say it cannot read it
        modes.add(st.st_mode & 0o777)
        uids.add(st.st_uid)
        gids.add(st.st_gid)
    mode = 0o777
    for m in modes:
        mode &= m if m is not None else 0o600
    uid = uids.pop() if len(uids) == 1 else os.geteuid()
    gid = gids.pop() if len(gids) == 1 else None
    if gid is None:
        mode &= ~0o070
        gid = os.getegid()
    return mode, uid, gid


def map_entry(p: MapPlan, deploy_id: str, key_entry: FileEntry) -> FileEntry:
    """The compiled table as a file of the deploy (``table_access``: its owner and mode)."""
    st, _ = files.inspect(files.real_path(p.table.compiled))
    src = temp_source(p.table, deploy_id)
    mode, uid, gid = table_access(p, key_entry)
    return FileEntry(role=MAP_ROLE, path=p.table.compiled, real=st.path, temp=p.table.compiled_for(src),
                     scratch=[src], new_sha256="", new_mode=mode, new_uid=uid, new_gid=gid, existed=st.exists,
                     old_sha256=st.sha256, old_mode=st.mode, old_uid=st.uid, old_gid=st.gid)


def build_beside(p: MapPlan, e: FileEntry, temps: dict[str, str], timeout: float) -> str:
    """Write the temp source (root's, 0600: postmap as root runs as the source's owner
    and copies its mode bits) naming the staged files in place of the live ones,
    compile it next to the live table, give the result its final owner and mode,
    fsync it. Returns its SHA-256."""
    entries = [SniEntry(x.key, tuple(temps.get(r, f) for f, r in zip(x.files, xr, strict=True)))
               for x, xr in zip(p.entries, p.reals, strict=True)]
    src = e.scratch[0]
    for stale in (src, e.temp):
        files.remove(stale)  # our own names, left by an attempt that died
    files.write_new(src, format_source(entries), 0o600)
    built = build(p.table, src, p.config_dir, timeout)
    assert built == e.temp
    return files.adopt(built, e.new_mode, e.new_uid, e.new_gid)
