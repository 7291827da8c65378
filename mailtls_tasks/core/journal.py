"""Host-local deploy journal: records, backups, per-file locks and owners, fences.

The journal is the source of truth for recovery: Redis may lose data, the host's
disk is what the daemon reads. Layout under ``state_dir`` (directories 0700, files
0600 -- backups hold private keys)::

    targets/<target>/deploys/<deploy_id>/record.json
    targets/<target>/deploys/<deploy_id>/backup/<role>   old bytes, before commit
    files/<K>.lock        flock held by whoever runs a step touching real file K
    files/<K>.fence       the highest fence staged on real file K, and by which deploy
    owners/<K>            the unfinished deploy that owns real file K: a directory of
                          its own, so that listing the deploys in flight costs what is
                          in flight, not every file the host ever deployed
    owners/.layout        written once the entries of a previous release's journal
                          (``files/<K>.owner``) have been moved here
    outbox/<target>~<deploy_id>   a distributed deploy ended here; Redis may not know yet
    batches/<deploy_id>.json      how each member of a batch ends, once the run decided it

K is the SHA-256 of the file's real path (symlinks resolved): two targets reaching
one file through different links share its lock and its owner. See docs/protocol.md
for who may take, hold and judge them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from ..errors import JournalError, TargetBusy
from ..ids import DEPLOY_ID_RE, check_deploy_id
from . import files

Phase = Literal[
    "staging", "staged", "validated", "committing", "committed", "reloaded", "verified",
    "rolling_back", "done",
]
Outcome = Literal["deployed", "unchanged", "rejected", "rolled_back", "failed"]
Origin = Literal["local", "distributed"]
STEP_NAMES = ("stage", "validate", "commit", "reload", "verify", "rollback")

_OUTBOX_SEP = "~"
LAYOUT_MARKER = ".layout"
_FILE_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_UPGRADING = threading.Lock()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------- process tokens
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None if the
    process is gone -- or a zombie: killed, not yet reaped (its parent may have been
    killed with it), it will never run again."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rfind(b")") + 2:].split()
    if len(rest) <= 19 or rest[0] in (b"Z", b"X"):
        return None
    return rest[19].decode()


_BOOT_ID = _boot_id()


def process_token(pid: int | None = None) -> str:
    """``boot_id:pid:start_time``: names one process, never a later one with its pid."""
    pid = os.getpid() if pid is None else pid
    return f"{_BOOT_ID}:{pid}:{_start_time(pid) or '?'}"


def process_alive(token: str | None) -> bool:
    """True while the process named by ``token`` runs (same boot, same pid, same start)."""
    if not token:
        return False
    boot, _, rest = token.partition(":")
    pid_s, _, start = rest.partition(":")
    if boot != _BOOT_ID or not pid_s.isdigit():
        return False
    return _start_time(int(pid_s)) == start


# ------------------------------------------------------------------------ records
class FileEntry(BaseModel):
    """One live file of the target and what this deploy does to it."""

    role: str
    path: str
    real: str
    temp: str
    # Files of our own made on the way to ``temp`` (the source postmap builds a table
    # from): removed with the temp.
    scratch: list[str] = Field(default_factory=list)
    new_sha256: str
    # Earlier new bytes of this file in the same deploy: an SNI table built again
    # when one name of a batch was rolled back alone. Live, they are this deploy's too.
    also_new: list[str] = Field(default_factory=list)
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
    origin: Origin = "local"
    created: str = Field(default_factory=now_iso)
    updated: str = Field(default_factory=now_iso)
    phase: Phase = "staging"
    rollback_from: Phase | None = None
    in_step: str | None = None
    runner: str | None = None
    lease_until: float | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    error: str | None = None
    fingerprint: str | None = None
    # SHA-256 over the certificates it was given (``material.input_digest``): what makes
    # a second run under the same id the same deploy (no key bytes go into it)
    input_sha256: str | None = None
    previous_fingerprint: str | None = None
    served_fingerprint: str | None = None
    # per certificate slot (its key type: "any", "rsa", "ecdsa"): a dual target has two
    leaves: dict[str, str] = Field(default_factory=dict)
    previous_leaves: dict[str, str] = Field(default_factory=dict)
    chains: dict[str, list[str]] = Field(default_factory=dict)
    not_after: str | None = None
    claimed: list[str] = Field(default_factory=list)
    files: list[FileEntry] = Field(default_factory=list)
    files_already_live: bool = False
    # An SNI target that is not the default: what each listener served without SNI at
    # stage (endpoint -> leaf); verify checks the deploy left it so.
    default_served: dict[str, str] = Field(default_factory=dict)
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    fence: int | None = None
    # A member of a batch (one deploy id, one run, one reload per daemon): every
    # member's target, itself included. Recovery ends a batch's members together
    # (``batches/<deploy_id>.json``: the decision, once the run has made it).
    batch: list[str] = Field(default_factory=list)
    # A batch sent through the workers: each member has its own deploy id (its own
    # record in Redis, its own envelope and fence), and the batch an id of its own,
    # which names its decision. Empty / None: every member shares this record's id.
    batch_ids: dict[str, str] = Field(default_factory=dict)
    batch_id: str | None = None
    # what the deploy did that the operator should know of besides its outcome (e.g. a
    # key file found readable by others, written 0600); never key material
    notes: list[str] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def member_id(self, target: str) -> str:
        """The deploy id of the batch's member ``target`` (this record's, unless the
        members were given their own)."""
        return self.batch_ids.get(target, self.deploy_id)

    @property
    def decision_id(self) -> str:
        """The id the batch's decision file is written under."""
        return self.batch_id or self.deploy_id

    @property
    def reals(self) -> list[str]:
        """The real files this deploy owns (and must lock for each of its steps)."""
        return list(dict.fromkeys([*self.claimed, *(f.real for f in self.files)]))


@dataclass(frozen=True)
class Owner:
    """What ``owners/K`` says: which deploy owns the real file ``path``."""

    path: str
    target: str
    deploy_id: str


class _HeldLocks:
    """The lock files this process has open, so a forked child can let go of them.

    A flock belongs to the open file description, and a child made by fork() shares
    it: were the child to live on holding a copy, the file would stay locked after its
    holder closed it. That is the worker's case: the recovery sweep, a thread of
    Celery's main process, may hold locks (through a whole rollback) when billiard
    forks a pool child. ``O_CLOEXEC`` covers exec, not fork; so the child closes its
    copies first thing, and the fork waits while a lock file is being opened."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.fds: set[int] = set()

    def before_fork(self) -> None:
        self.guard.acquire()

    def after_fork_in_parent(self) -> None:
        self.guard.release()

    def after_fork_in_child(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = set()
        self.guard = threading.Lock()  # the parent's, held by the forking thread: not ours


_HELD = _HeldLocks()
os.register_at_fork(before=_HELD.before_fork, after_in_parent=_HELD.after_fork_in_parent,
                    after_in_child=_HELD.after_fork_in_child)


def file_key(real: str) -> str:
    return hashlib.sha256(real.encode()).hexdigest()[:32]


def _names(directory: str) -> list[str]:
    """The entries of a journal directory; none if it was never created."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _io(what: str, path: str) -> Iterator[None]:
    """Turn an OSError on the journal into a JournalError naming the file and errno."""
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, str(err.errno))
        raise JournalError(f"journal: cannot {what} {path}: [{code}] {err.strerror or err}") from None


class Journal:
    """The deploy journal of one host, rooted at ``state_dir``.

    ``clock`` and ``alive`` are the two facts about the world the protocol depends on
    (what time it is, whether a process still runs); the model test gives its own.
    """

    def __init__(self, state_dir: str, *, clock: Callable[[], float] = time.time,
                 alive: Callable[[str | None], bool] = process_alive,
                 token: Callable[[], str] = process_token) -> None:
        self.root = os.path.abspath(state_dir)
        self._owners_ready = False  # owners/ checked (and a previous release's entries moved)
        self.clock = clock
        self.alive = alive
        self.token = token

    # -- paths ------------------------------------------------------------
    def target_dir(self, target: str) -> str:
        return os.path.join(self.root, "targets", target)

    def deploy_dir(self, target: str, deploy_id: str) -> str:
        return os.path.join(self.target_dir(target), "deploys", check_deploy_id(deploy_id))

    def backup_path(self, target: str, deploy_id: str, role: str) -> str:
        return os.path.join(self.deploy_dir(target, deploy_id), "backup", role)

    def _record_path(self, target: str, deploy_id: str) -> str:
        return os.path.join(self.deploy_dir(target, deploy_id), "record.json")

    def _ensure_dir(self, path: str) -> None:
        with _io("create directory", path):
            files.private_dirs(self.root, path)

    # -- records ----------------------------------------------------------
    def load(self, target: str, deploy_id: str) -> DeployRecord | None:
        path = self._record_path(target, deploy_id)
        with _io("read", path):
            data = files.read_bytes(path)
        if data is None:
            return None
        try:
            return DeployRecord.model_validate_json(data)
        except ValidationError:
            raise JournalError(f"journal: {path} is corrupt (not a deploy record)") from None

    def save(self, record: DeployRecord) -> DeployRecord:
        record.updated = now_iso()
        d = self.deploy_dir(record.target, record.deploy_id)
        self._ensure_dir(d)
        path = os.path.join(d, "record.json")
        with _io("write", path):
            files.atomic_write(path, record.model_dump_json(indent=1).encode(), 0o600)
        return record

    def write_intent(self, target: str, deploy_id: str, origin: str) -> None:
        """The first trace of a deploy on this host, before its record: a process killed
        before the record's first save still leaves who it was (full-scan recovery ends
        such a deploy ``rolled_back``/``interrupted`` instead of leaving it unknown)."""
        d = self.deploy_dir(target, deploy_id)
        self._ensure_dir(d)
        path = os.path.join(d, "intent")
        with _io("write", path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps({"origin": origin, "runner": self.token()}).encode())
            finally:
                os.close(fd)

    def _deploy_ids(self, target: str) -> list[str]:
        """The names under the target's ``deploys/`` that are deploy ids (nothing else is trusted)."""
        return [n for n in _names(os.path.join(self.target_dir(target), "deploys")) if DEPLOY_ID_RE.match(n)]

    def abandoned(self, target: str) -> list[tuple[str, str, str | None]]:
        """(deploy_id, origin, runner) of deploys with an intent and no record yet."""
        out = []
        for name in self._deploy_ids(target):
            d = self.deploy_dir(target, name)
            if os.path.exists(os.path.join(d, "record.json")):
                continue
            raw = files.read_bytes(os.path.join(d, "intent"))
            try:
                intent = json.loads(raw or b"{}")
            except ValueError:
                intent = {}
            if intent:
                out.append((name, str(intent.get("origin", "local")), intent.get("runner")))
        return out

    def write_backup(self, target: str, deploy_id: str, role: str, data: bytes) -> str:
        path = self.backup_path(target, deploy_id, role)
        self._ensure_dir(os.path.dirname(path))
        with _io("write backup", path):
            files.atomic_write(path, data, 0o600)
        return path

    def read_backup(self, target: str, deploy_id: str, role: str) -> bytes | None:
        path = self.backup_path(target, deploy_id, role)
        with _io("read backup", path):
            return files.read_bytes(path)

    def records(self, target: str) -> list[DeployRecord]:
        out = []
        for name in self._deploy_ids(target):
            with contextlib.suppress(JournalError):
                rec = self.load(target, name)
                if rec is not None:
                    out.append(rec)
        out.sort(key=lambda r: r.created)
        return out

    def last_finished(self, target: str) -> DeployRecord | None:
        finished = [r for r in self.records(target) if r.finished]
        return finished[-1] if finished else None

    def prune(self, target: str, keep: int) -> None:
        """Keep the last ``keep`` finished deploys' backups; never touch unfinished ones."""
        finished = [r for r in self.records(target) if r.finished]
        for rec in finished[: max(0, len(finished) - keep)]:
            if self.has_outbox(target, rec.deploy_id):
                continue  # Redis has not heard how it ended yet: keep the record to tell it
            shutil.rmtree(self.deploy_dir(target, rec.deploy_id), ignore_errors=True)

    # -- fencing ----------------------------------------------------------
    # Kept per real file, like ownership: two targets sharing a file share its fence, so
    # an envelope signed before a newer deploy through the other target cannot win.
    def fence_state(self, reals: list[str], target: str | None = None) -> tuple[int, str | None]:
        """(highest fence staged on any of these files, the deploy that staged it)."""
        paths = [os.path.join(self._files_dir(), file_key(r) + ".fence") for r in reals]
        if target is not None:  # where fences lived before they were kept per file
            paths.append(os.path.join(self.target_dir(target), "fence"))
        best: tuple[int, str | None] = (0, None)
        for path in paths:
            with _io("read", path):
                data = files.read_bytes(path)
            if not data:
                continue
            try:
                d = json.loads(data)
                state = (int(d["fence"]), d.get("deploy_id"))
            except (ValueError, KeyError, TypeError):
                continue
            if state[0] > best[0]:
                best = state
        return best

    def record_fence(self, reals: list[str], fence: int, deploy_id: str) -> None:
        self._ensure_dir(self._files_dir())
        body = json.dumps({"fence": fence, "deploy_id": deploy_id}).encode()
        for real in reals:
            path = os.path.join(self._files_dir(), file_key(real) + ".fence")
            with _io("write", path):
                files.atomic_write(path, body, 0o600)

    # -- per-file locks ----------------------------------------------------
    def _files_dir(self) -> str:
        return os.path.join(self.root, "files")

    @contextlib.contextmanager
    def lock_files(self, reals: Iterable[str], timeout: float = 0.0,
                   busy: Callable[[str], str] | None = None) -> Iterator[None]:
        """Hold the flocks of these real files (sorted: no deadlock); TargetBusy if one
        is not free within ``timeout`` s. ``busy(real)`` words the error."""
        d = self._files_dir()
        self._ensure_dir(d)
        fds: list[int] = []
        deadline = time.monotonic() + timeout
        pid = os.getpid()
        try:
            for real in sorted(set(reals), key=file_key):
                path = os.path.join(d, file_key(real) + ".lock")
                with _io("open lock", path), _HELD.guard:  # no fork between the open and the record
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    _HELD.fds.add(fd)
                fds.append(fd)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as err:
                        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                            raise
                        if time.monotonic() >= deadline:
                            raise TargetBusy(busy(real) if busy else f"{real} is busy with another deploy") from None
                        time.sleep(0.02)
            yield
        finally:
            if os.getpid() == pid:  # a child forked in between closed its copies at the fork
                with _HELD.guard:
                    for fd in fds:
                        _HELD.fds.discard(fd)
                        os.close(fd)  # closing drops the flock

    # -- owners -------------------------------------------------------------
    def _owners_dir(self) -> str:
        return os.path.join(self.root, "owners")

    def _owner_path(self, real: str) -> str:
        self._upgrade_owners()
        return os.path.join(self._owners_dir(), file_key(real))

    def _upgrade_owners(self) -> None:
        """Move a previous release's owner entries (``files/<K>.owner``) to
        ``owners/<K>``, once: the marker is written after the last one is moved, so a
        crash half-way moves the rest next time. Each move is one rename (an entry is
        in one place or the other, never lost); two processes upgrading at once each
        move what the other has not. The previous release must not be running beside
        this one on the same state directory (a package upgrade restarts its units)."""
        if self._owners_ready:
            return
        with _UPGRADING:  # two threads of one process would write the marker through one temp name
            self._upgrade_owners_locked()

    def _upgrade_owners_locked(self) -> None:
        marker = os.path.join(self._owners_dir(), LAYOUT_MARKER)
        if os.path.exists(marker):
            self._owners_ready = True
            return
        self._ensure_dir(self._owners_dir())
        legacy = self._files_dir()
        moved = False
        for name in _names(legacy):
            if name.endswith(".owner"):
                with contextlib.suppress(FileNotFoundError), _io("move owner entry", os.path.join(legacy, name)):
                    os.rename(os.path.join(legacy, name), os.path.join(self._owners_dir(), name[:-len(".owner")]))
                    moved = True
        with _io("write", marker):
            if moved:
                files.fsync_dir(legacy)
            files.atomic_write(marker, b"1\n", 0o600)
        self._owners_ready = True

    def owner_of(self, real: str) -> Owner | None:
        path = self._owner_path(real)
        with _io("read", path):
            data = files.read_bytes(path)
        return self._parse_owner(data)

    @staticmethod
    def _parse_owner(data: bytes | None) -> Owner | None:
        if not data:
            return None
        try:
            d = json.loads(data)
            return Owner(path=d["path"], target=d["target"], deploy_id=d["deploy_id"])
        except (ValueError, KeyError, TypeError):
            return None

    def set_owner(self, real: str, rec: DeployRecord) -> None:
        """Caller holds the file's lock and has checked no other live deploy owns it."""
        path = self._owner_path(real)
        body = json.dumps({"path": real, "target": rec.target, "deploy_id": rec.deploy_id}).encode()
        self._ensure_dir(self._owners_dir())  # as every write here: the state dir may have been emptied since
        with _io("write", path):
            files.atomic_write(path, body, 0o600)

    def clear_owner(self, real: str, deploy_id: str, target: str | None = None) -> None:
        """Remove the owner entry if (and only if) it names this deploy (of ``target``)."""
        owner = self.owner_of(real)
        if owner is not None and owner.deploy_id == deploy_id and target in (None, owner.target):
            with _io("remove", self._owner_path(real)):
                files.remove(self._owner_path(real))

    def owners(self) -> list[Owner]:
        """Every owner entry on the host: the deploys in flight (cheap: not per target)."""
        self._upgrade_owners()
        d = self._owners_dir()
        out = []
        for name in _names(d):
            if _FILE_KEY_RE.match(name):  # not the layout marker, nor an atomic write's temp
                owner = self._parse_owner(files.read_bytes(os.path.join(d, name)))
                if owner is not None:
                    out.append(owner)
        return out

    # -- batches: the decision that ends them --------------------------------
    def _decision_path(self, deploy_id: str) -> str:
        return os.path.join(self.root, "batches", check_deploy_id(deploy_id) + ".json")

    def write_decision(self, deploy_id: str, outcomes: dict[str, str]) -> None:
        """How each member of a batch ends, written once, atomically, before any member
        is finished: a crash while finishing them leaves recovery the same decision."""
        path = self._decision_path(deploy_id)
        self._ensure_dir(os.path.dirname(path))
        with _io("write", path):
            files.atomic_write(path, json.dumps(outcomes, sort_keys=True).encode(), 0o600)

    def decision(self, deploy_id: str) -> dict[str, str] | None:
        path = self._decision_path(deploy_id)
        with _io("read", path):
            data = files.read_bytes(path)
        if data is None:
            return None
        try:
            out = json.loads(data)
        except ValueError:
            raise JournalError(f"journal: {path} is corrupt (not a batch decision)") from None
        return {str(k): str(v) for k, v in out.items()}

    # -- outbox: endings Redis may not have heard of ----------------------------
    def _outbox_dir(self) -> str:
        return os.path.join(self.root, "outbox")

    def _outbox_path(self, target: str, deploy_id: str) -> str:
        return os.path.join(self._outbox_dir(), f"{target}{_OUTBOX_SEP}{deploy_id}")

    def outbox_add(self, target: str, deploy_id: str) -> None:
        self._ensure_dir(self._outbox_dir())
        path = self._outbox_path(target, deploy_id)
        with _io("write", path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def outbox(self) -> list[tuple[str, str]]:
        out = []
        for name in sorted(_names(self._outbox_dir())):
            target, sep, deploy_id = name.rpartition(_OUTBOX_SEP)
            if sep and DEPLOY_ID_RE.match(deploy_id):
                out.append((target, deploy_id))
        return out

    def has_outbox(self, target: str, deploy_id: str) -> bool:
        return os.path.exists(self._outbox_path(target, deploy_id))

    def outbox_age(self, target: str, deploy_id: str) -> float:
        try:
            mtime = os.stat(self._outbox_path(target, deploy_id)).st_mtime
        except FileNotFoundError:
            return 0.0
        return time.time() - mtime

    def outbox_done(self, target: str, deploy_id: str) -> bool:
        """Drop the entry once Redis has the ending. True for exactly one caller (the
        unlink is atomic): that one counts the ending, so each is counted once."""
        try:
            os.unlink(self._outbox_path(target, deploy_id))
        except FileNotFoundError:
            return False
        return True
