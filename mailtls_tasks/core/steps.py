"""The six steps of a deploy, as plain functions over the host's filesystem.

stage -> validate -> commit -> reload -> verify, and rollback as compensation.
No Celery here: the in-process runner and the Celery tasks call the same functions.

The protocol they implement is docs/protocol.md. In short:

* each step is keyed by ``deploy_id`` and recorded in the host journal; running it
  again returns the record (idempotent), a finished deploy is never touched again,
  and forward steps never act on a deploy that is rolling back;
* stage **claims** the deploy's real files (owner entries); the deploy owns them until
  it finishes; the caller holds their flocks around every call (``ownership.holding``
  for stage, ``Journal.lock_files(rec.claimed)`` after it);
* commit and rollback are **compare-and-swap** on the files: they act only on files
  that hold exactly the bytes they expect, and stop (reporting what is live) otherwise;
* a step marks ``in_step`` while it runs and renews a distributed deploy's lease, so
  recovery can tell a deploy that died from one that is waiting for its next message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeGuard

from ..errors import (
    CommandFailed,
    CommandTimeout,
    CommitFailed,
    Conflict,
    DeployFailed,
    MailTLSError,
    MaterialError,
    Rejected,
    StepFailed,
    Superseded,
    TargetBusy,
    ValidationFailed,
    VerifyFailed,
)
from . import files, material, probe
from .commands import CommandResult, Running, run_command
from .config import HostConfig, Target
from .ids import check_deploy_id
from .journal import DeployRecord, FileEntry, Journal, Origin, Phase, StepRecord
from .material import Bundle
from .names import leaf_names, uncovered, validation_names

ORDER: dict[Phase, int] = {
    "staging": 0, "staged": 1, "validated": 2, "committing": 3, "committed": 4,
    "reloaded": 5, "verified": 6, "rolling_back": 7, "done": 8,
}
DEFAULT_LEASE = 600.0
# An early-started validate_command (``StepContext.early_validate``) stands for the
# validate step only if that step begins within this many seconds of its start: after
# a long wait for the target's lock, the config is checked afresh.
EARLY_VALIDATE_MAX_AGE = 10.0
RESTORE_ATTEMPTS = 3


@dataclass(frozen=True)
class StepContext:
    """What every step needs: the target's config, the host journal and host name.

    ``lease``: how long a distributed deploy stays alive between two of its steps.
    ``early_validate``: the target's validate_command, started before the deploy
    staged (it checks the daemon's config, which a deploy never changes); validate
    collects its verdict instead of running it again.
    ``sharing``: the host's other targets that read at least one of this target's
    files; stage refuses to leave one of them with files its daemon cannot serve.
    """

    target: Target
    journal: Journal
    host: str = ""
    lease: float = DEFAULT_LEASE
    early_validate: Running | None = field(default=None, compare=False)
    sharing: tuple[Target, ...] = ()  # the host's other targets reading one of these files

    def load(self, deploy_id: str) -> DeployRecord:
        rec = self.journal.load(self.target.name, check_deploy_id(deploy_id))
        if rec is None:
            raise Rejected(f"deploy {deploy_id} is unknown on this host for target {self.target.name!r} "
                           "(stage never ran here)")
        return rec

    def save(self, rec: DeployRecord) -> DeployRecord:
        return self.journal.save(rec)


class HostContexts(Mapping[str, StepContext]):
    """Every target's StepContext by name, each made on first use: a run touches one or
    two of a host's targets, and making all of them cost every in-process run time in
    proportion to the size of the host."""

    def __init__(self, cfg: HostConfig, journal: Journal) -> None:
        self.cfg, self.journal = cfg, journal
        self._made: dict[str, StepContext] = {}

    def __getitem__(self, name: str) -> StepContext:
        ctx = self._made.get(name)
        if ctx is None:
            t = self.cfg.targets[name]
            ctx = self._made[name] = StepContext(t, self.journal, self.cfg.host, self.cfg.deploy_lease,
                                                 sharing=self.cfg.sharing_with(name))
        return ctx

    def __iter__(self) -> Iterator[str]:
        return iter(self.cfg.targets)

    def __len__(self) -> int:
        return len(self.cfg.targets)


def target_reals(t: Target) -> list[str]:
    """The real files a deploy of ``t`` writes (symlinks resolved): what it must own."""
    return [files.real_path(path) for _, path in t.files()]


def _begin(ctx: StepContext, rec: DeployRecord, name: str) -> None:
    """Mark the step as running (and renew the lease) before doing anything to files."""
    rec.in_step = name
    rec.runner = ctx.journal.token()
    if rec.origin == "distributed":
        rec.lease_until = ctx.journal.clock() + ctx.lease
    ctx.save(rec)


@contextlib.contextmanager
def _timed(ctx: StepContext, rec: DeployRecord, name: str) -> Iterator[None]:
    """Record the step's status and duration in the journal, whatever happens.

    A process that dies inside leaves ``in_step`` set: that is how recovery knows it
    died mid-step. An exception (the process lives on) clears it.
    """
    _begin(ctx, rec, name)
    t0 = time.monotonic()
    try:
        yield
    except Exception as err:
        if not rec.finished:
            detail = str(err) if isinstance(err, MailTLSError) else f"internal error: {type(err).__name__}"
            rec.steps[name] = StepRecord(status="failed", ms=int((time.monotonic() - t0) * 1000), detail=detail)
            rec.in_step = None
            ctx.save(rec)
        raise
    prior = rec.steps.get(name)
    if prior is None or prior.status not in ("skipped", "failed"):
        status: Literal["ok", "failed"] = "failed" if rec.outcome == "failed" else "ok"
        rec.steps[name] = StepRecord(status=status, ms=int((time.monotonic() - t0) * 1000))
    rec.in_step = None
    if rec.origin == "distributed" and not rec.finished:
        rec.lease_until = ctx.journal.clock() + ctx.lease
    ctx.save(rec)


def _skip(rec: DeployRecord, name: str, detail: str) -> None:
    rec.steps[name] = StepRecord(status="skipped", ms=0, detail=detail)


def already_staged(rec: DeployRecord | None) -> TypeGuard[DeployRecord]:
    """Stage ran to the end for this deploy (or the deploy is over): a redelivered
    stage must return the record, never stage again or re-judge its input."""
    return rec is not None and (rec.finished or rec.phase != "staging")


def moving_forward(rec: DeployRecord) -> bool:
    """Forward steps may act: the deploy is neither finished nor rolling back."""
    return not rec.finished and rec.phase != "rolling_back"


def _done(rec: DeployRecord, phase_at_least: Phase) -> bool:
    return not moving_forward(rec) or ORDER[rec.phase] >= ORDER[phase_at_least]


def _finish(ctx: StepContext, rec: DeployRecord, outcome: str, error: str | None = None,
            reason: str | None = None) -> DeployRecord:
    """End the deploy: outcome recorded, files released, an outbox entry for Redis."""
    rec.outcome = outcome  # type: ignore[assignment]
    rec.phase = "done"
    rec.error = error
    rec.reason = reason
    rec.in_step = None
    rec.lease_until = None
    if rec.origin == "distributed":
        ctx.journal.outbox_add(rec.target, rec.deploy_id)
    ctx.save(rec)
    for real in rec.reals:
        ctx.journal.clear_owner(real, rec.deploy_id, rec.target)
    ctx.journal.prune(ctx.target.name, ctx.target.backup_retention)
    return rec


def _temp_for(real: str, deploy_id: str) -> str:
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.mailtls-{deploy_id}.tmp")


def _remove_temps(rec: DeployRecord) -> None:
    for f in rec.files:
        with contextlib.suppress(OSError):
            files.remove(f.temp)


LiveState = Literal["old", "new", "other"]


def live_state(e: FileEntry) -> LiveState:
    """What the live file holds now, compared with this deploy's snapshot and new bytes."""
    _, data = files.inspect(e.real)
    digest = material.sha256(data) if data is not None else None
    if digest == e.old_sha256:  # both None: absent before, absent now
        return "old"  # first: a file whose bytes do not change (often the chain) is "old"
    if digest == e.new_sha256:
        return "new"
    return "other"


def holds_new(e: FileEntry) -> bool:
    """The live file holds exactly this deploy's new bytes (whether or not they changed)."""
    _, data = files.inspect(e.real)
    return data is not None and material.sha256(data) == e.new_sha256


def _describe_live(rec: DeployRecord, states: dict[str, LiveState]) -> str:
    return ", ".join(f"{e.role} {e.real}: {states[e.real]}" for e in rec.files)


# --------------------------------------------------------------------------- stage
RawBundle = tuple[bytes, bytes, bytes | None]


def stage(ctx: StepContext, deploy_id: str, cert_pem: bytes, key_pem: bytes,
          chain_pem: bytes | None = None, *, force: bool = False, fence: int | None = None,
          origin: Origin = "local", now: dt.datetime | None = None,
          also: list[RawBundle] | None = None) -> DeployRecord:
    """Claim the files, check the material, back up the live files, write the new
    ones as temps.

    Ends the deploy as ``unchanged`` when the bytes are already live (and, with
    verify on, already served), or ``rejected`` when the material is bad or the
    deploy is superseded. The caller holds the target's file locks and has made sure
    no other live deploy owns them (``ownership.holding``).
    """
    t = ctx.target
    rec = ctx.journal.load(t.name, check_deploy_id(deploy_id))
    if already_staged(rec):
        return rec
    rerun = rec is not None
    if rec is not None:  # a previous attempt died mid-stage: nothing live was touched
        _remove_temps(rec)
    else:
        ctx.journal.write_intent(t.name, deploy_id, origin)
    reals = target_reals(t)
    for real in reals:
        owner = ctx.journal.owner_of(real)
        if owner is not None and (owner.target, owner.deploy_id) != (t.name, deploy_id):
            other = ctx.journal.load(owner.target, owner.deploy_id)
            if other is not None and not other.finished:
                raise TargetBusy(f"{real} is owned by deploy {owner.deploy_id} of target {owner.target!r}")
    rec = DeployRecord(deploy_id=deploy_id, target=t.name, host=ctx.host, fence=fence, origin=origin,
                       claimed=reals, input_sha256=material.input_digest([cert_pem, *(c for c, _, _ in also or [])]))
    # Claim before the record exists: an owner entry without a record is stale and
    # cleared, a record without its owner entries would be invisible to recovery.
    for real in reals:
        ctx.journal.set_owner(real, rec)
    with _timed(ctx, rec, "stage"):
        try:
            if fence is not None:
                _check_fence(ctx, fence, rec, rerun=rerun)
            _stage(ctx, rec, [(cert_pem, key_pem, chain_pem), *(also or [])], force=force, now=now)
        except Rejected as err:  # Superseded included
            _remove_temps(rec)
            rec.steps["stage"] = StepRecord(status="failed", detail=str(err))
            _finish(ctx, rec, "rejected", str(err), err.reason)
            raise
    return rec


def tombstone(ctx: StepContext, deploy_id: str, origin: Origin) -> DeployRecord:
    """End a deploy that died before its first record was saved: nothing was touched.
    A late stage message for it then finds it ended instead of starting it."""
    rec = DeployRecord(deploy_id=deploy_id, target=ctx.target.name, host=ctx.host, origin=origin)
    rec.steps["stage"] = StepRecord(status="failed", detail="interrupted before it was staged")
    return _finish(ctx, rec, "rolled_back", "the deploy was interrupted before it was staged; nothing was touched",
                   "interrupted")


def _check_fence(ctx: StepContext, fence: int, rec: DeployRecord, *, rerun: bool) -> None:
    """A stale, replayed or overtaken envelope must not overwrite a newer deploy.

    Strictly greater than the highest fence staged on any of its files; equal only
    for the very deploy that recorded it when its record is still here in ``staging``
    (its stage died and runs again). The fence is recorded after the record is first
    saved, so "fence recorded, no record" means the record was pruned: a replay."""
    highest, by = ctx.journal.fence_state(rec.reals, ctx.target.name)
    if fence < highest or (fence == highest and not (by == rec.deploy_id and rerun)):
        raise Superseded(f"superseded: a deploy with fence {highest} already ran on these files "
                         f"({ctx.target.name!r} or a target sharing them); this one has fence {fence}")
    ctx.journal.record_fence(rec.reals, fence, rec.deploy_id)


def _slot_bundles(t: Target, raw: list[RawBundle], now: dt.datetime | None) -> list[tuple[str, str, Bundle]]:
    """(role prefix, key type, checked bundle) for each of the target's certificate slots."""
    slots = t.slots()
    bundles = [material.build_bundle(c, k, ch, now=now) for c, k, ch in raw]
    kinds = [b.key_type for b in bundles]
    wanted = [k for _, k, *_ in slots]
    if len(bundles) != len(slots) or (len(slots) > 1 and sorted(kinds) != sorted(wanted)):
        need = " and ".join(k.upper() for k in wanted) if len(slots) > 1 else "one"
        raise MaterialError(f"cert: target {t.name!r} takes {need} certificate{'s' if len(slots) > 1 else ''}; "
                            f"got {len(bundles)} ({', '.join(k.upper() for k in kinds)})")
    out: list[tuple[str, str, Bundle]] = []
    for prefix, kind, *_ in slots:
        bundle = next(b for b in bundles if kind in ("any", b.key_type)) if len(slots) > 1 else bundles[0]
        if kind != "any" and bundle.key_type != kind:
            raise MaterialError(f"cert: target {t.name!r} takes an {kind.upper()} certificate; got "
                                f"{bundle.key_type.upper()}")
        out.append((prefix, kind, bundle))
    return out


def _stage(ctx: StepContext, rec: DeployRecord, raw: list[RawBundle], *, force: bool,
           now: dt.datetime | None) -> None:
    t = ctx.target
    slots = _slot_bundles(t, raw, now)
    wanted: dict[str, bytes] = {}
    for (prefix, kind, bundle), (_, _, _, _, chain_path, combined) in zip(slots, t.slots(), strict=True):
        what = f"{kind.upper()} certificate" if kind != "any" else "certificate"
        if chain_path and not bundle.chain and not bundle.self_signed:
            raise MaterialError(f"chain: target {t.name!r} has a chain_path for its {what} but the bundle carries no "
                                "chain (clients such as Thunderbird need it)")
        missing = uncovered(t.names, bundle.leaf)
        if missing:
            raise MaterialError(f"names: the {what} does not cover {', '.join(missing)}, which target {t.name!r} "
                                f"must serve (it covers: {', '.join(leaf_names(bundle.leaf)) or 'no DNS name'})")
        material.check_path(bundle, t.trust_anchors, allow_self_signed=t.allow_self_signed, names=t.names, now=now)
        wanted.update(bundle.file_bytes(chain_path_set=bool(chain_path), combined=bool(combined), prefix=prefix))
        rec.leaves[kind] = bundle.fingerprint
        rec.chains[kind] = bundle.chain_fingerprints()
    primary = slots[0][2]
    rec.fingerprint = primary.fingerprint
    rec.not_after = min(b.leaf.not_valid_after_utc for _, _, b in slots).isoformat()

    current: dict[str, tuple[files.FileState, bytes | None]] = {}
    for role, path in t.files():
        current[role] = files.inspect(files.real_path(path))
    old_spkis: dict[str, str | None] = {}
    for (prefix, kind, bundle), (_, _, _, _, _, combined) in zip(slots, t.slots(), strict=True):
        leaf_data = current[prefix + ("combined" if combined else "cert")][1]
        old_leaf = material.leaf_of_file(leaf_data) if leaf_data else None
        if old_leaf is not None:
            rec.previous_leaves[kind] = material.fingerprint(old_leaf)
        old_spkis[kind] = material.spki_sha256(old_leaf.public_key()) if old_leaf is not None else None
        material.check_not_older(bundle.leaf, old_leaf, force)
    rec.previous_fingerprint = rec.previous_leaves.get(slots[0][1])
    if t.dane is not None:
        from . import dane

        changed = [b for _, kind, b in slots if old_spkis.get(kind) != b.spki_sha256()]
        if changed:
            dane.require_ready(t, ctx.journal, [b.spki_sha256() for b in changed])

    uid_cfg, gid_cfg = files.resolve_owner(t.owner, t.group)
    entries = []
    for role, path in t.files():
        st, _ = current[role]
        secret = role.endswith(("key", "combined"))  # a combined file holds the key too
        configured = t.key_mode if secret else t.cert_mode
        default = 0o600 if secret else 0o644
        new_mode = configured if configured is not None else (st.mode if st.exists else default)
        assert new_mode is not None
        entries.append(FileEntry(
            role=role, path=path, real=st.path, temp=_temp_for(st.path, rec.deploy_id),
            new_sha256=material.sha256(wanted[role]), new_mode=new_mode,
            new_uid=uid_cfg if uid_cfg is not None else st.uid,
            new_gid=gid_cfg if gid_cfg is not None else st.gid,
            existed=st.exists, old_sha256=st.sha256, old_mode=st.mode, old_uid=st.uid, old_gid=st.gid,
        ))
    rec.files = entries

    if all(e.existed and e.old_sha256 == e.new_sha256 for e in entries):
        rec.files_already_live = True
        if not t.verify_endpoints():
            _finish_unchanged(ctx, rec, "bytes already live; verify is off")
            return
        served = _served_now(t, rec.leaves)
        rec.served_fingerprint = served.get(slots[0][1])
        if all(served.get(kind) == fp for kind, fp in rec.leaves.items()):
            _finish_unchanged(ctx, rec, "bytes already live and served")
            return
        # Same bytes on disk, another leaf served (e.g. a second daemon sharing the
        # file was never reloaded): nothing to write, but reload and verify anyway.
        rec.phase = "staged"
        return

    _check_sharing(ctx, slots, entries, wanted, old_spkis, now)
    ctx.save(rec)  # temps named in the journal before they exist: recovery can find them
    for e in entries:
        if e.existed:
            data = current[e.role][1]
            assert data is not None
            ctx.journal.write_backup(t.name, rec.deploy_id, e.role, data)
    for e in entries:
        os.makedirs(os.path.dirname(e.real), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.temp)  # our own name, left by an attempt that died
        try:
            files.write_new(e.temp, wanted[e.role], e.new_mode, e.new_uid, e.new_gid)
        except OSError as err:
            _remove_temps(rec)
            raise Rejected(f"{e.role}: cannot stage next to {e.real}: {err.strerror or err}") from None
    rec.phase = "staged"


def _check_sharing(ctx: StepContext, slots: list[tuple[str, str, Bundle]], entries: list[FileEntry],
                   wanted: dict[str, bytes], old_spkis: dict[str, str | None], now: dt.datetime | None) -> None:
    """What this deploy writes, judged for the host's other targets that read any of it.

    One that will serve the new leaf (it reads the certificate file) must accept it as
    it would its own: key type, names, trust anchors, DANE readiness. One that shares
    only part of a certificate's files (the key, each with a certificate of its own;
    or the certificate, one of them with a chain file) must not be left with files its
    daemon cannot serve: a key that is not its certificate's, a chain that did not issue
    it, its chain taken away. Only what this deploy would break counts; what was wrong
    before is not ours to judge. ``old_spkis``: by our slot's key type, the key of the
    leaf in place, as stage read it."""
    after = {e.real: wanted[e.role] for e in entries}
    ours: dict[str, dict[str, str]] = {}  # our slot prefix -> role -> real file
    slot_of: dict[str, str] = {}  # real file -> the prefix of our slot that writes it
    for e in entries:
        prefix = "alt_" if e.role.startswith("alt_") else ""
        ours.setdefault(prefix, {})[e.role.removeprefix(prefix)] = e.real
        slot_of[e.real] = prefix
    bundles = {prefix: bundle for prefix, _, bundle in slots}
    kinds = {prefix: kind for prefix, kind, _ in slots}
    for other in ctx.sharing:
        for _, kind, cert, key, chain, combined in other.slots():
            paths = {"combined": combined} if combined else {"cert": cert, "key": key,
                                                              **({"chain": chain} if chain else {})}
            reals = {role: files.real_path(path) for role, path in paths.items()}
            touched = [role for role, real in reals.items() if real in after]
            if not touched:
                continue
            where = (f"shared files: target {other.name!r} also reads "
                     f"{', '.join(sorted(paths[r] for r in touched))}")
            bundle = bundles[slot_of[reals[touched[0]]]]
            leaf_real = reals.get("combined") or reals["cert"]
            if leaf_real in after:  # it will serve our leaf, in place of the one in that file now
                ours_at = slot_of[leaf_real]
                _judge_for(ctx, other, kind, bundles[ours_at], old_spkis.get(kinds[ours_at]), where, now)
            if combined or reals in ours.values():  # the very files of one of our slots, laid out alike
                continue
            try:
                before = {role: files.read_bytes(real) for role, real in reals.items()}
            except OSError as err:
                raise Rejected(f"{where}, and {err.filename or 'one of its files'} cannot be read to check that "
                               f"it stays whole: {err.strerror or err}") from None
            if any(b is None for b in before.values()):
                continue  # not all in place: nothing of its is live to break
            was = {role: b or b"" for role, b in before.items()}
            will = {role: after.get(reals[role], was[role]) for role in reals}
            broken = (material.set_problems(will["cert"], will["key"], will.get("chain"))
                      - material.set_problems(was["cert"], was["key"], was.get("chain")))
            if not bundle.chain:  # a leaf that needs no chain leaves none to take away
                broken.discard(material.NO_CHAIN)
            if broken:
                raise MaterialError(f"{where}; this deploy would leave it with {' and '.join(sorted(broken))}. "
                                    f"Deploy the same certificate to both, or give {other.name!r} files of its own")


def _judge_for(ctx: StepContext, other: Target, kind: str, bundle: Bundle, old_spki: str | None, where: str,
               now: dt.datetime | None) -> None:
    """The checks stage makes of a bundle for its own target, made for ``other``
    (``old_spki``: the key of the leaf it serves now, None if there is none)."""
    try:
        if kind != "any" and bundle.key_type != kind:
            raise MaterialError(f"it takes an {kind.upper()} certificate there, this one is "
                                f"{bundle.key_type.upper()}")
        missing = uncovered(other.names, bundle.leaf)
        if missing:
            raise MaterialError(f"the certificate does not cover {', '.join(missing)}, which it must serve")
        material.check_path(bundle, other.trust_anchors, allow_self_signed=other.allow_self_signed,
                            names=other.names, now=now)
        if other.dane is not None:
            from . import dane

            if old_spki != bundle.spki_sha256():
                dane.require_ready(other, ctx.journal, [bundle.spki_sha256()])
    except Rejected as err:
        raised = type(err)(f"{where}: {err}")
        raised.reason = err.reason
        raise raised from None


def _finish_unchanged(ctx: StepContext, rec: DeployRecord, detail: str) -> None:
    for name in ("validate", "commit", "reload", "verify"):
        _skip(rec, name, detail)
    rec.steps["stage"] = StepRecord(status="ok")
    _finish(ctx, rec, "unchanged")


# ------------------------------------------------------------------------ validate
def validate(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Load the staged pair as OpenSSL will and shake hands with it; then the
    operator's validate_command. Failure ends the deploy ``rejected``, live untouched."""
    rec = ctx.load(deploy_id)
    if _done(rec, "validated"):
        return rec
    if ORDER[rec.phase] < ORDER["staged"]:  # a stage that died half-way: its files are not all named yet
        raise StepFailed(f"deploy {deploy_id} cannot validate from phase {rec.phase!r}")
    with _timed(ctx, rec, "validate"):
        try:
            _local_handshake(ctx, rec)
            if ctx.target.validate_command.strip():
                res = _validate_command(ctx)
                if not res.ok:
                    raise ValidationFailed(f"validate_command failed: {res.summary()}")
        except Rejected as err:
            _remove_temps(rec)
            rec.steps["validate"] = StepRecord(status="failed", detail=str(err))
            _finish(ctx, rec, "rejected", str(err))
            raise
        rec.phase = "validated"
    return rec


def _validate_command(ctx: StepContext) -> CommandResult:
    t, early = ctx.target, ctx.early_validate
    if early is not None and not early.done:
        if early.command == t.validate_command and early.age() <= EARLY_VALIDATE_MAX_AGE:
            return early.wait(t.command_timeout)
        early.cancel()
    return run_command(t.validate_command, timeout=t.command_timeout, field="validate_command")


def _local_handshake(ctx: StepContext, rec: DeployRecord) -> None:
    """Each certificate slot's staged files load into OpenSSL as the daemon will load
    them, and a handshake with them serves that slot's new leaf."""
    by_role = {e.role: (e.real if rec.files_already_live else e.temp) for e in rec.files}
    for prefix, kind, *_ in ctx.target.slots():
        expected = rec.leaves.get(kind, rec.fingerprint)
        made = None
        if prefix + "combined" in by_role:  # key, leaf and chain in one file: as Postfix reads it
            certfile = keyfile = by_role[prefix + "combined"]
        else:
            certfile, keyfile = by_role[prefix + "cert"], by_role[prefix + "key"]
            if prefix + "chain" in by_role:  # the daemon is given the chain separately; OpenSSL wants one file
                cert_bytes = files.read_bytes(certfile) or b""
                chain_bytes = files.read_bytes(by_role[prefix + "chain"]) or b""
                made = os.path.join(ctx.journal.deploy_dir(rec.target, rec.deploy_id), f"handshake-{kind}.pem")
                files.atomic_write(made, cert_bytes + chain_bytes, 0o600)
                certfile = made
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                server.load_cert_chain(certfile, keyfile)
            except (ssl.SSLError, OSError) as err:
                raise ValidationFailed(f"the staged {kind if kind != 'any' else ''} cert/key do not load into "
                                       f"OpenSSL: {err}".replace("  ", " ")) from None
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            if _memory_handshake(client, server) != expected:
                raise ValidationFailed("a local handshake with the staged files served another certificate")
        finally:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(made)


def _memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> str:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        for obj, is_client in ((c, True), (s, False)):
            if (c_done if is_client else s_done):
                continue
            try:
                obj.do_handshake()
                if is_client:
                    c_done = True
                else:
                    s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                raise ValidationFailed(f"local TLS handshake with the staged files failed: {err}") from None
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if c_done and s_done:
            break
    if not c_done:
        raise ValidationFailed("local TLS handshake with the staged files did not complete")
    der = c.getpeercert(binary_form=True)
    if not der:
        raise ValidationFailed("local TLS handshake presented no certificate")
    return material.fingerprint_der(der)


# -------------------------------------------------------------------------- commit
def commit(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Rename each staged temp over its live file (fixed order), fsyncing the dir.

    Compare-and-swap: a live file must still hold the bytes stage snapshotted (or,
    when a commit runs again after dying half-way, this deploy's new bytes), and each
    temp is re-hashed before its rename. A file changed behind our back ends the
    deploy ``rejected`` (reason ``conflict``) if nothing of ours is live yet."""
    rec = ctx.load(deploy_id)
    if _done(rec, "committed"):
        return rec
    if ORDER[rec.phase] < ORDER["validated"]:
        raise CommitFailed(f"deploy {deploy_id} cannot commit from phase {rec.phase!r}")
    with _timed(ctx, rec, "commit"):
        if rec.files_already_live:
            _skip(rec, "commit", "bytes already live")
        else:
            states = {e.real: live_state(e) for e in rec.files}
            allowed = ("old",) if rec.phase == "validated" else ("old", "new")
            if any(s not in allowed for s in states.values()):
                what = _describe_live(rec, states)
                if rec.phase == "validated":
                    _remove_temps(rec)
                    msg = (f"conflict: the live files changed since stage ({what}); "
                           "nothing was replaced")
                    rec.steps["commit"] = StepRecord(status="failed", detail=msg)
                    _finish(ctx, rec, "rejected", msg, "conflict")
                    raise Conflict(msg)
                raise CommitFailed(f"conflict: a live file changed during the commit ({what})")
            rec.phase = "committing"
            ctx.save(rec)  # from here on, a rollback restores the backups
            for e in rec.files:
                if states[e.real] == "new":
                    continue
                try:
                    _, staged = files.inspect(e.temp)
                    if staged is None and e.old_sha256 == e.new_sha256:
                        continue  # same bytes, already renamed by a commit that died
                    if staged is None:
                        raise CommitFailed(f"{e.role}: staged file {e.temp} is missing")
                    if material.sha256(staged) != e.new_sha256:
                        raise CommitFailed(f"{e.role}: staged file {e.temp} changed since stage")
                    files.replace(e.temp, e.real)
                except OSError as err:
                    raise CommitFailed(f"{e.role}: cannot replace {e.real}: {err.strerror or err}") from None
        rec.phase = "committed"
    return rec


# -------------------------------------------------------------------------- reload
def reload(ctx: StepContext, deploy_id: str) -> DeployRecord:
    rec = ctx.load(deploy_id)
    if _done(rec, "reloaded"):
        return rec
    if ORDER[rec.phase] < ORDER["committed"]:
        raise StepFailed(f"deploy {deploy_id} cannot reload from phase {rec.phase!r}")
    with _timed(ctx, rec, "reload"):
        res = run_command(ctx.target.reload_command, timeout=ctx.target.command_timeout,
                          field="reload_command")
        if not res.ok:
            raise CommandFailed(f"reload_command failed: {res.summary()}")
        rec.phase = "reloaded"
    return rec


# -------------------------------------------------------------------------- verify
def verify(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Poll every listener until it serves the new leaf -- each algorithm's, on a dual
    target -- with the chain that was deployed (and, with ``trust_anchors``, a chain that
    validates for the target's names). The last step: it finishes the deploy as
    ``deployed``. Never runs on a deploy that is rolling back."""
    rec = ctx.load(deploy_id)
    if not moving_forward(rec):
        return rec
    if ORDER[rec.phase] < ORDER["reloaded"]:
        raise StepFailed(f"deploy {deploy_id} cannot verify from phase {rec.phase!r}")
    t = ctx.target
    with _timed(ctx, rec, "verify"):
        if not t.verify_endpoints():
            _skip(rec, "verify", "post_deploy_verify is off")
        else:
            try:
                served = _wait_served(t, rec.leaves or {"any": rec.fingerprint or ""}, rec.chains)
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                raise
            rec.served_fingerprint = served
        rec.phase = "verified"
        _finish(ctx, rec, "deployed")
    return rec


def _expected(kind: str) -> str | None:
    return None if kind == "any" else kind


def _wait_served(t: Target, leaves: dict[str, str], chains: dict[str, list[str]] | None) -> str | None:
    """Every listener serves every slot's leaf (``chains``: with the chain deployed),
    within the verify timeout (one deadline for them all). Returns the primary leaf."""
    listeners = t.verify_endpoints()
    deadline = time.monotonic() + listeners[0].timeout
    anchors = material.load_anchors(t.trust_anchors) if t.trust_anchors and chains is not None else None
    first: str | None = None
    for li in listeners:
        for kind, fp in leaves.items():
            left = max(0.5, deadline - time.monotonic())
            served = probe.wait_for(li, fp, timeout=left, algorithm=_expected(kind) if len(leaves) > 1 else None)
            first = first or served.fingerprint
            if chains is None:
                continue
            what = f"{li.endpoint}" + (f" ({kind.upper()})" if len(leaves) > 1 else "")
            if served.chain_fingerprints != chains.get(kind, served.chain_fingerprints):
                raise VerifyFailed(f"{what} serves the new leaf with another chain ({len(served.chain) - 1} "
                                   f"certificate(s) after the leaf, {len(chains.get(kind, []))} deployed): the daemon "
                                   "reads the chain from elsewhere", served=served.fingerprint)
            if anchors is not None:
                for name in validation_names(t.names, served.chain[0]):
                    why = material.chain_problem(served.chain[0], served.chain[1:], name, anchors)
                    if why:
                        raise VerifyFailed(f"{what} serves a chain that does not validate for {name}: {why}",
                                           served=served.fingerprint)
    return first


def _served_now(t: Target, leaves: dict[str, str]) -> dict[str, str]:
    """What every listener serves now, per slot: kind -> fingerprint, when all agree."""
    out: dict[str, str] = {}
    for kind in leaves:
        seen = set()
        for li in t.verify_endpoints():
            try:
                seen.add(probe.probe_listener(li, _expected(kind) if len(leaves) > 1 else None).fingerprint)
            except probe.ProbeError:
                seen.add("")
        if len(seen) == 1 and "" not in seen:
            out[kind] = seen.pop()
    return out


def finish_forward(ctx: StepContext, deploy_id: str) -> DeployRecord | None:
    """Recovery's roll-forward: a dead deploy that had reloaded, whose new set is
    wholly live and whose new leaves a fresh probe sees served everywhere, ends
    ``deployed``. Returns None when that cannot be shown (the caller rolls back)."""
    rec = ctx.load(deploy_id)
    if not moving_forward(rec) or ORDER[rec.phase] < ORDER["reloaded"]:
        return None
    if not all(holds_new(e) for e in rec.files):
        return None
    t = ctx.target
    leaves = rec.leaves or {"any": rec.fingerprint or ""}
    if t.verify_endpoints():
        served = _served_now(t, leaves)
        if any(served.get(kind) != fp for kind, fp in leaves.items()):
            return None
    with _timed(ctx, rec, "verify"):
        if t.verify_endpoints():
            rec.served_fingerprint = rec.fingerprint
        else:
            _skip(rec, "verify", "post_deploy_verify is off")
        rec.phase = "verified"
        _finish(ctx, rec, "deployed", reason="recovered")
    return rec


# ------------------------------------------------------------------------ rollback
def rollback(ctx: StepContext, deploy_id: str, error: str | None = None,
             reason: str | None = None, *, boot: bool = False) -> DeployRecord:
    """Compensate a failed deploy: restore the old bytes exactly, reload, check.

    ``boot``: run before the daemons start (the boot-time recovery unit). A reload
    that fails then means the daemon is not running yet: it will read the restored
    files when it starts, so the deploy ends ``rolled_back`` (the error says so) and
    nothing is probed. A daemon that is up is reloaded and checked as always.

    Converges from any phase and after any number of crashes (recovery runs it
    again): the phase it started from is kept in ``rollback_from``, and what to do
    with each file is decided from what the file holds now. Ends ``rolled_back`` (old
    set live and, with verify on, served again), ``rejected`` (nothing was ever
    committed) or ``failed`` (an operator is needed; the error says what is live).
    """
    rec = ctx.load(deploy_id)
    if rec.finished:
        return rec
    failed_steps = [s.detail for s in rec.steps.values() if s.status == "failed" and s.detail]
    # the step that failed says more than "interrupted" (recovery's generic reason)
    original_error = rec.error or (failed_steps[-1] if failed_steps else None) or error or "the deploy failed"
    if rec.phase != "rolling_back":
        rec.rollback_from = rec.phase
        rec.phase = "rolling_back"
    started_from = rec.rollback_from or "staging"
    rec.error = original_error
    t = ctx.target
    with _timed(ctx, rec, "rollback"):
        _remove_temps(rec)
        if ORDER[started_from] < ORDER["committing"]:
            outcome = "rolled_back" if reason == "interrupted" else "rejected"
            return _finish(ctx, rec, outcome, original_error, reason)
        if rec.files_already_live:
            return _finish(ctx, rec, "failed", _no_older_set(ctx, rec, original_error), reason)
        states = {e.real: live_state(e) for e in rec.files}
        if any(s == "other" for s in states.values()):
            return _finish(ctx, rec, "failed",
                           f"{original_error}; conflict: a live file holds neither the old nor this deploy's new "
                           f"bytes ({_describe_live(rec, states)}), so nothing was restored; "
                           + _state_report(ctx, rec), "conflict")
        try:
            _restore(ctx, rec, states)
        except (OSError, MailTLSError) as err:
            return _finish(ctx, rec, "failed", f"{original_error}; restoring the old files failed: {err}; "
                           + _state_report(ctx, rec), reason)
        try:
            _reload_with_retry(t)
        except MailTLSError as err:
            if boot:
                return _finish(ctx, rec, "rolled_back", f"{original_error}; old files restored at boot, before "
                               f"{t.mode} started (reload: {err}): it starts on them", reason)
            return _finish(ctx, rec, "failed", f"{original_error}; old files restored but reload failed: {err}; "
                           + _state_report(ctx, rec), reason)
        previous = rec.previous_leaves or ({"any": rec.previous_fingerprint} if rec.previous_fingerprint else {})
        if t.verify_endpoints() and previous and len(previous) == len(t.slots()):
            try:
                rec.served_fingerprint = _wait_served(t, previous, None)
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                return _finish(ctx, rec, "failed", f"{original_error}; old files restored but not served: {err}",
                               reason)
        _finish(ctx, rec, "rolled_back", original_error, reason)
    return rec


def _reload_with_retry(t: Target, attempts: int = 2) -> None:
    for i in range(attempts):
        try:
            res = run_command(t.reload_command, timeout=t.command_timeout, field="reload_command")
        except CommandTimeout:
            if i == attempts - 1:
                raise
            continue
        if res.ok:
            return
        raise CommandFailed(res.summary())


def _restore(ctx: StepContext, rec: DeployRecord, states: dict[str, LiveState]) -> None:
    """Put back every file that holds this deploy's new bytes exactly as it was
    (bytes, mode, owner), or remove it if it did not exist before. Each restore is
    its own atomic rename, in the commit's order; a file already old is left alone
    unless its mode or owner differ."""
    for e in rec.files:
        if not e.existed:
            if states[e.real] == "new":
                files.remove(e.real)
            continue
        st, _ = files.inspect(e.real)
        if states[e.real] == "old" and st.mode == e.old_mode and st.uid == e.old_uid and st.gid == e.old_gid:
            continue
        data = ctx.journal.read_backup(rec.target, rec.deploy_id, e.role)
        if data is None or material.sha256(data) != e.old_sha256:
            raise DeployFailed(f"{e.role}: backup of {e.real} is missing or corrupt")
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            try:
                _restore_one(e, data)
                break
            except OSError:
                # A full disk or an I/O error may pass (a log rotated, a retry on another
                # block): a restore is worth a second try before calling an operator.
                with contextlib.suppress(OSError):
                    os.unlink(e.temp)
                if attempt == RESTORE_ATTEMPTS:
                    raise
                time.sleep(0.2 * attempt)


def _restore_one(e: FileEntry, data: bytes) -> None:
    assert e.old_mode is not None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(e.temp)
    files.write_new(e.temp, data, e.old_mode, e.old_uid, e.old_gid)
    _, written = files.inspect(e.temp)
    if written is None or material.sha256(written) != e.old_sha256:
        raise DeployFailed(f"{e.role}: the restored temp {e.temp} does not hold the backup's bytes")
    files.replace(e.temp, e.real)


def _state_report(ctx: StepContext, rec: DeployRecord) -> str:
    """What is on disk and what is served: the facts an operator needs first."""
    parts = []
    t = ctx.target
    cert = files.read_bytes(files.real_path(t.leaf_file()))
    key = files.read_bytes(files.real_path(t.combined_path or t.key_path))
    leaf = material.leaf_of_file(cert) if cert else None
    on_disk = material.fingerprint(leaf) if leaf else "none"
    which = ("new" if on_disk == rec.fingerprint else "old" if on_disk == rec.previous_fingerprint else "other")
    match = material.key_matches_cert(key, cert) if cert and key else False
    parts.append(f"on disk: {on_disk} ({which} set, key {'matches' if match else 'DOES NOT match'})")
    for li in t.verify_endpoints():
        try:
            parts.append(f"served on {li.endpoint}: {probe.probe_listener(li).fingerprint}")
        except probe.ProbeError as err:
            parts.append(f"served on {li.endpoint}: unknown ({err})")
    return "; ".join(parts)


def _no_older_set(ctx: StepContext, rec: DeployRecord, error: str | None) -> str:
    return (f"{error}; the new files were already on disk before this deploy, so there is no older "
            f"set to return to; " + _state_report(ctx, rec))
