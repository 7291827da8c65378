"""Host-local deploy journal, durable backups and the per-target host lock.

The journal is the source of truth for recovery: Redis may lose data, the host's
disk is what the daemon reads. Layout under ``state_dir`` (directories 0700, files
0600 -- backups hold private keys)::

    targets/<target>/lock                         flock held by whoever runs a step
    targets/<target>/deploys/<deploy_id>/record.json
    targets/<target>/deploys/<deploy_id>/backup/<role>   old bytes, before commit

"Is the deploy that wrote this entry still alive?" is answered by the lock, not by
the clock: a step holds ``flock`` on its target while it runs, and the kernel drops
it when the process dies, so an unfinished entry whose lock is free was abandoned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field

from . import files
from .errors import ConfigError, TargetBusy

Phase = Literal[
    "staging", "staged", "validated", "committing", "committed", "reloaded", "verified",
    "rolling_back", "done",
]
Outcome = Literal["deployed", "unchanged", "rejected", "rolled_back", "failed"]
STEP_NAMES = ("stage", "validate", "commit", "reload", "verify", "rollback")

DEPLOY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class FileEntry(BaseModel):
    """One live file of the target and what this deploy does to it."""

    role: str
    path: str
    real: str
    temp: str
    new_sha256: str
    new_mode: int
    new_uid: int | None = None
    new_gid: int | None = None
    existed: bool
    old_sha256: str | None = None
    old_mode: int | None = None
    old_uid: int | None = None
    old_gid: int | None = None


class StepRecord(BaseModel):
    status: Literal["ok", "failed", "skipped"]
    ms: int = 0
    detail: str | None = None


class DeployRecord(BaseModel):
    """Everything known about one deploy; never contains key material."""

    deploy_id: str
    target: str
    host: str = ""
    created: str = Field(default_factory=now_iso)
    updated: str = Field(default_factory=now_iso)
    phase: Phase = "staging"
    outcome: Outcome | None = None
    reason: str | None = None
    error: str | None = None
    fingerprint: str | None = None
    previous_fingerprint: str | None = None
    served_fingerprint: str | None = None
    not_after: str | None = None
    files: list[FileEntry] = Field(default_factory=list)
    files_already_live: bool = False
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    fence: int | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None


def check_deploy_id(deploy_id: str) -> str:
    if not DEPLOY_ID_RE.match(deploy_id):
        raise ConfigError(f"deploy_id {deploy_id!r} is not valid (letters, digits, '_', '-'; max 64)")
    return deploy_id


class Journal:
    """The deploy journal of one host, rooted at ``state_dir``."""

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.abspath(state_dir)

    # -- paths ------------------------------------------------------------
    def target_dir(self, target: str) -> str:
        return os.path.join(self.root, "targets", target)

    def deploy_dir(self, target: str, deploy_id: str) -> str:
        return os.path.join(self.target_dir(target), "deploys", check_deploy_id(deploy_id))

    def backup_path(self, target: str, deploy_id: str, role: str) -> str:
        return os.path.join(self.deploy_dir(target, deploy_id), "backup", role)

    def _ensure_dir(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    # -- records ----------------------------------------------------------
    def load(self, target: str, deploy_id: str) -> DeployRecord | None:
        path = os.path.join(self.deploy_dir(target, deploy_id), "record.json")
        data = files.read_bytes(path)
        if data is None:
            return None
        return DeployRecord.model_validate_json(data)

    def save(self, record: DeployRecord) -> DeployRecord:
        record.updated = now_iso()
        d = self.deploy_dir(record.target, record.deploy_id)
        self._ensure_dir(d)
        files.atomic_write(os.path.join(d, "record.json"), record.model_dump_json(indent=1).encode(), 0o600)
        return record

    def write_backup(self, target: str, deploy_id: str, role: str, data: bytes) -> str:
        path = self.backup_path(target, deploy_id, role)
        self._ensure_dir(os.path.dirname(path))
        files.atomic_write(path, data, 0o600)
        return path

    def read_backup(self, target: str, deploy_id: str, role: str) -> bytes | None:
        return files.read_bytes(self.backup_path(target, deploy_id, role))

    def records(self, target: str) -> list[DeployRecord]:
        base = os.path.join(self.target_dir(target), "deploys")
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not DEPLOY_ID_RE.match(name):
                continue
            rec = self.load(target, name)
            if rec is not None:
                out.append(rec)
        out.sort(key=lambda r: r.created)
        return out

    def targets(self) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.root, "targets")))
        except FileNotFoundError:
            return []

    def unfinished(self, target: str) -> list[DeployRecord]:
        return [r for r in self.records(target) if not r.finished]

    def prune(self, target: str, keep: int) -> None:
        """Keep the last ``keep`` finished deploys' backups; never touch unfinished ones."""
        finished = [r for r in self.records(target) if r.finished]
        for rec in finished[: max(0, len(finished) - keep)]:
            shutil.rmtree(self.deploy_dir(target, rec.deploy_id), ignore_errors=True)

    # -- fencing ----------------------------------------------------------
    def highest_fence(self, target: str) -> int:
        """The largest fence token this host has staged for ``target`` (0 if none)."""
        data = files.read_bytes(os.path.join(self.target_dir(target), "fence"))
        try:
            return int(data or b"0")
        except ValueError:
            return 0

    def record_fence(self, target: str, fence: int) -> None:
        self._ensure_dir(self.target_dir(target))
        files.atomic_write(os.path.join(self.target_dir(target), "fence"), str(fence).encode(), 0o600)

    # -- locking ----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, target: str, timeout: float = 0.0) -> Iterator[None]:
        """Hold the target's host lock; TargetBusy if not free within ``timeout`` s."""
        d = self.target_dir(target)
        self._ensure_dir(d)
        fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise TargetBusy(f"target {target!r} is busy with another deploy on this host") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing drops the flock
