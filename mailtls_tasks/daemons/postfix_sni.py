"""Postfix's SNI table (``tls_server_sni_maps``): its source, its compiled form, postmap.

What a deploy must know of it (postconf(5), postmap(1), and what Postfix 3.7 and 3.10
were seen to do, see shared/notes/sni-maps.md):

- The source lists ``KEY FILE[, FILE ...]``: the key is an SNI name, or a parent
  domain with a leading dot (``.example.net``: every name below it); the files are
  read in order, each private key followed by its certificate chain.
- An indexed table (``hash:``, ``btree:``, ``lmdb:``, ``cdb:``) is built with
  ``postmap -F``, which stores each key's file *contents* (base64, the private keys
  included) in the compiled file: new files are served only once the table is built
  again. postmap rewrites an existing table in place (same inode, its old mode kept;
  a crash mid-build leaves a table no smtpd can read), so a deploy builds it beside
  and renames it. Run as root, postmap runs as the source's owner and gives the new
  table the source's group/other mode bits: the source it builds from is root's, 0600.
- ``texthash:`` (and ``inline:``) name files that smtpd reads when it opens the table:
  swapping the files and reloading is the whole job.
- smtpd looks up the SNI name verbatim, then each parent domain with a leading dot
  (``lookup_keys``); ``postmap -q`` does not, so a check of what a name is served
  walks the keys itself.

Plain values in and out: the core decides every path; postmap writes the one it is told.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError
from .found import run_tool

# type -> the compiled file's suffix (None: no compiled file, the source is read at open)
TABLE_TYPES: dict[str, str | None] = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb",
                                      "texthash": None}
POSTMAP = "postmap"
_SEPARATORS = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class SniEntry:
    """One key of the table and the files it names, in order."""

    key: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class SniMap:
    """One table of ``tls_server_sni_maps``, as a target's ``sni.map`` names it."""

    type: str
    source: str

    @property
    def spec(self) -> str:
        return f"{self.type}:{self.source}"

    @property
    def suffix(self) -> str | None:
        return TABLE_TYPES[self.type]

    @property
    def indexed(self) -> bool:
        """Built with postmap: the compiled file holds the PEM bytes, not the file names."""
        return self.suffix is not None

    @property
    def compiled(self) -> str:
        """The file smtpd opens ('' for a table read from its source)."""
        return self.source + self.suffix if self.suffix else ""

    def compiled_for(self, source: str) -> str:
        """The file ``postmap -F`` writes for another source path (the temp one)."""
        assert self.suffix
        return source + self.suffix


def parse_map(spec: str, field: str = "sni.map") -> SniMap:
    """``lmdb:/etc/postfix/sni`` -> SniMap; ValueError naming what is wrong."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"{field}: {spec!r} is not TYPE:/path (e.g. lmdb:/etc/postfix/sni)")
    if kind not in TABLE_TYPES:
        raise ValueError(f"{field}: table type {kind!r} is not one a deploy can rebuild here (it takes: "
                         f"{', '.join(TABLE_TYPES)}); with LDAP or SQL the PEM lives outside Postfix's files")
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise ValueError(f"{field}: {path!r} must be an absolute, normalised path")
    for suffix in {s for s in TABLE_TYPES.values() if s}:
        if path.endswith(suffix):
            raise ValueError(f"{field}: name the table as main.cf does, by its source ({path[:-len(suffix)]}), "
                             f"not its compiled file {path}")
    return SniMap(kind, path)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """postmap(1)'s input: '#' comments and blank lines skipped, a line starting with
    white space continues the one before."""
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0].isspace() and current:
            current.append(stripped)
            continue
        if current:
            yield start, " ".join(current)
        current, start = [stripped], number
    if current:
        yield start, " ".join(current)


def parse_source(text: str, where: str) -> list[SniEntry]:
    """The entries of a source file; ConfigError naming the line of a bad one."""
    out: list[SniEntry] = []
    seen: set[str] = set()
    for number, line in _logical_lines(text):
        key, *rest = line.split(None, 1)
        value = rest[0] if rest else ""
        key = key.lower()  # postmap folds keys to lower case
        files = tuple(f for f in _SEPARATORS.split(value.strip()) if f)
        if not files:
            raise ConfigError(f"{where}:{number}: {key!r} names no file")
        bad = [f for f in files if not os.path.isabs(f)]
        if bad:
            raise ConfigError(f"{where}:{number}: {key!r}: {bad[0]} is not an absolute path")
        if key in seen:
            raise ConfigError(f"{where}:{number}: {key!r} is listed twice")
        seen.add(key)
        out.append(SniEntry(key, files))
    return out


def format_source(entries: list[SniEntry]) -> bytes:
    """A source postmap reads back into ``entries`` (one line each)."""
    return "".join(f"{e.key} {', '.join(e.files)}\n" for e in entries).encode()


def lookup_keys(name: str) -> list[str]:
    """The keys smtpd tries for an SNI name, in order: the name, then each parent
    domain with a leading dot."""
    labels = name.lower().rstrip(".").split(".")
    return [name.lower().rstrip(".")] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def key_for_name(name: str) -> str:
    """The table key a target's name is served by: ``*.example.net`` -> ``.example.net``."""
    return name[1:] if name.startswith("*.") else name


def name_for_key(key: str) -> str:
    """The name a target lists for a table key: ``.example.net`` -> ``*.example.net``."""
    return "*" + key if key.startswith(".") else key


def _postmap(args: list[str], config_dir: str, timeout: float, what: str) -> str:
    # postmap's own messages name files and keys, never their contents
    return run_tool([POSTMAP, "-c", config_dir, *args], what, timeout)


def build(table: SniMap, source: str, config_dir: str, timeout: float) -> str:
    """``postmap -F TYPE:SOURCE``: compile ``source`` (a file the caller wrote, root's
    and 0600) into ``table.compiled_for(source)``; returns that path."""
    _postmap(["-F", f"{table.type}:{source}"], config_dir, timeout, f"building {table.spec}")
    return table.compiled_for(source)


def dump(table: SniMap, source: str, config_dir: str, timeout: float) -> dict[str, bytes]:
    """Every key of the table compiled from ``source`` and the bytes it holds (what
    ``postmap -Fq`` prints, without postmap's extra newline). Holds private keys: for
    comparison only, never to be shown."""
    out = _postmap(["-s", f"{table.type}:{source}"], config_dir, timeout, f"reading {table.spec}")
    values: dict[str, bytes] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("\t")
        if not sep:
            raise ConfigError(f"reading {table.spec}: postmap -s printed a line without a value")
        try:
            values[key] = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ConfigError(f"reading {table.spec}: the value of {key!r} is not base64: was the table built "
                              "without postmap -F?") from None
    return values
