"""What a live file holds now, against this deploy's snapshot and new bytes: the
compare in commit's and rollback's compare-and-swap."""

from __future__ import annotations

from typing import Literal

from .. import files, material
from ..journal import DeployRecord, FileEntry

LiveState = Literal["old", "new", "other"]


def live_state(e: FileEntry) -> LiveState:
    """What the live file holds now, compared with this deploy's snapshot and new bytes."""
    _, data = files.inspect(e.real)
    digest = material.sha256(data) if data is not None else None
    if digest == e.old_sha256:  # both None: absent before, absent now
        return "old"  # first: a file whose bytes do not change (often the chain) is "old"
    if digest == e.new_sha256 or (digest is not None and digest in e.also_new):
        return "new"
    return "other"


def holds_new(e: FileEntry) -> bool:
    """The live file holds exactly this deploy's new bytes (whether or not they changed)."""
    _, data = files.inspect(e.real)
    return data is not None and material.sha256(data) == e.new_sha256


def describe_live(rec: DeployRecord, states: dict[str, LiveState]) -> str:
    return ", ".join(f"{e.role} {e.real}: {states[e.real]}" for e in rec.files)
