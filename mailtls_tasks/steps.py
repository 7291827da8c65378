"""The six steps of a deploy, as plain functions over the host's filesystem.

stage -> validate -> commit -> reload -> verify, and rollback as compensation.
No Celery here: the in-process runner and the Celery tasks call the same functions.

Each step is keyed by ``deploy_id`` and recorded in the host journal, and each is
safe to run again: a step that already finished for this deploy returns the record
unchanged, a finished deploy is never touched again, and rollback converges from
any phase (it is also what recovery runs after a crash).

The caller must hold the target's host lock (``Journal.lock``) around each call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeGuard

from . import files, material, probe
from .commands import run_command
from .config import Target
from .errors import (
    CommandFailed,
    CommandTimeout,
    CommitFailed,
    DeployFailed,
    MailTLSError,
    MaterialError,
    Rejected,
    StepFailed,
    Superseded,
    ValidationFailed,
    VerifyFailed,
)
from .journal import DeployRecord, FileEntry, Journal, Phase, StepRecord, check_deploy_id

ORDER: dict[Phase, int] = {
    "staging": 0, "staged": 1, "validated": 2, "committing": 3, "committed": 4,
    "reloaded": 5, "verified": 6, "rolling_back": 7, "done": 8,
}


@dataclass(frozen=True)
class StepContext:
    """What every step needs: the target's config, the host journal and host name."""

    target: Target
    journal: Journal
    host: str = ""

    def load(self, deploy_id: str) -> DeployRecord:
        rec = self.journal.load(self.target.name, check_deploy_id(deploy_id))
        if rec is None:
            raise Rejected(f"deploy {deploy_id} is unknown on this host for target {self.target.name!r} "
                           "(stage never ran here)")
        return rec

    def save(self, rec: DeployRecord) -> DeployRecord:
        return self.journal.save(rec)


@contextlib.contextmanager
def _timed(ctx: StepContext, rec: DeployRecord, name: str) -> Iterator[None]:
    """Record the step's status and duration in the journal, whatever happens."""
    t0 = time.monotonic()
    try:
        yield
    except MailTLSError as err:
        rec.steps[name] = StepRecord(status="failed", ms=int((time.monotonic() - t0) * 1000), detail=str(err))
        ctx.save(rec)
        raise
    prior = rec.steps.get(name)
    if prior is None or prior.status != "skipped":
        rec.steps[name] = StepRecord(status="ok", ms=int((time.monotonic() - t0) * 1000))
    ctx.save(rec)


def _skip(rec: DeployRecord, name: str, detail: str) -> None:
    rec.steps[name] = StepRecord(status="skipped", ms=0, detail=detail)


def already_staged(rec: DeployRecord | None) -> TypeGuard[DeployRecord]:
    """Stage ran to the end for this deploy (or the deploy is over): a redelivered
    stage must return the record, never stage again or re-judge its input."""
    return rec is not None and _done(rec, "staged")


def _done(rec: DeployRecord, phase_at_least: Phase) -> bool:
    return rec.finished or ORDER[rec.phase] >= ORDER[phase_at_least]


def _finish(ctx: StepContext, rec: DeployRecord, outcome: str, error: str | None = None,
            reason: str | None = None) -> DeployRecord:
    rec.outcome = outcome  # type: ignore[assignment]
    rec.phase = "done"
    rec.error = error
    rec.reason = reason
    ctx.save(rec)
    ctx.journal.prune(ctx.target.name, ctx.target.backup_retention)
    return rec


def _temp_for(real: str, deploy_id: str) -> str:
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.mailtls-{deploy_id}.tmp")


def _remove_temps(rec: DeployRecord) -> None:
    for f in rec.files:
        with contextlib.suppress(OSError):
            files.remove(f.temp)


# --------------------------------------------------------------------------- stage
def stage(ctx: StepContext, deploy_id: str, cert_pem: bytes, key_pem: bytes,
          chain_pem: bytes | None = None, *, force: bool = False, fence: int | None = None,
          now: dt.datetime | None = None) -> DeployRecord:
    """Check the material, back up the live files, write the new ones as temps.

    Ends the deploy as ``unchanged`` when the bytes are already live (and, with
    verify on, already served), or ``rejected`` when the material is bad.
    """
    t = ctx.target
    rec = ctx.journal.load(t.name, check_deploy_id(deploy_id))
    if already_staged(rec):
        return rec
    if rec is not None:  # a previous attempt died mid-stage: nothing live was touched
        _remove_temps(rec)
    rec = DeployRecord(deploy_id=deploy_id, target=t.name, host=ctx.host, fence=fence)
    with _timed(ctx, rec, "stage"):
        try:
            if fence is not None:
                _check_fence(ctx, fence)
            _stage(ctx, rec, cert_pem, key_pem, chain_pem, force=force, now=now)
        except Rejected as err:  # Superseded included
            _remove_temps(rec)
            rec.steps["stage"] = StepRecord(status="failed", detail=str(err))
            _finish(ctx, rec, "rejected", str(err), "superseded" if isinstance(err, Superseded) else None)
            raise
    return rec


def _check_fence(ctx: StepContext, fence: int) -> None:
    """A stale, redelivered or overtaken message must not overwrite a newer deploy."""
    highest = ctx.journal.highest_fence(ctx.target.name)
    if fence < highest:
        raise Superseded(f"superseded: a newer deploy of {ctx.target.name!r} (fence {highest}) already ran "
                         f"on this host; this one has fence {fence}")
    ctx.journal.record_fence(ctx.target.name, fence)


def _stage(ctx: StepContext, rec: DeployRecord, cert_pem: bytes, key_pem: bytes,
           chain_pem: bytes | None, *, force: bool, now: dt.datetime | None) -> None:
    t = ctx.target
    bundle = material.build_bundle(cert_pem, key_pem, chain_pem, now=now)
    rec.fingerprint = bundle.fingerprint
    rec.not_after = bundle.leaf.not_valid_after_utc.isoformat()
    if t.chain_path and not bundle.chain and not bundle.self_signed:
        raise MaterialError(
            f"chain: target {t.name!r} has chain_path set but the bundle carries no chain "
            "(clients such as Thunderbird need it)"
        )
    wanted = bundle.file_bytes(chain_path_set=bool(t.chain_path))

    current: dict[str, tuple[files.FileState, bytes | None]] = {}
    for role, path in t.files():
        current[role] = files.inspect(files.real_path(path))
    cert_now = current["cert"][1]
    old_leaf = material.leaf_of_file(cert_now) if cert_now else None
    rec.previous_fingerprint = material.fingerprint(old_leaf) if old_leaf else None
    material.check_not_older(bundle.leaf, old_leaf, force)

    uid_cfg, gid_cfg = files.resolve_owner(t.owner, t.group)
    entries = []
    for role, path in t.files():
        st, _ = current[role]
        configured = t.key_mode if role == "key" else t.cert_mode
        default = 0o600 if role == "key" else 0o644
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
        v = t.post_deploy_verify
        if not v.enabled:
            _finish_unchanged(ctx, rec, "bytes already live; verify is off")
            return
        try:
            served = probe.probe_settings(v).fingerprint
        except probe.ProbeError:
            served = None
        rec.served_fingerprint = served
        if served == rec.fingerprint:
            _finish_unchanged(ctx, rec, "bytes already live and served")
            return
        # Same bytes on disk, another leaf served (e.g. a second daemon sharing the
        # file was never reloaded): nothing to write, but reload and verify anyway.
        rec.phase = "staged"
        ctx.save(rec)
        return

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


def _finish_unchanged(ctx: StepContext, rec: DeployRecord, detail: str) -> None:
    for name in ("validate", "commit", "reload", "verify"):
        _skip(rec, name, detail)
    rec.outcome = "unchanged"
    rec.phase = "done"


# ------------------------------------------------------------------------ validate
def validate(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Load the staged pair as OpenSSL will and shake hands with it; then the
    operator's validate_command. Failure ends the deploy ``rejected``, live untouched."""
    rec = ctx.load(deploy_id)
    if _done(rec, "validated"):
        return rec
    with _timed(ctx, rec, "validate"):
        try:
            _local_handshake(ctx, rec)
            if ctx.target.validate_command.strip():
                res = run_command(ctx.target.validate_command, timeout=ctx.target.command_timeout,
                                  field="validate_command")
                if not res.ok:
                    raise ValidationFailed(f"validate_command failed: {res.summary()}")
        except Rejected as err:
            _remove_temps(rec)
            rec.steps["validate"] = StepRecord(status="failed", detail=str(err))
            _finish(ctx, rec, "rejected", str(err))
            raise
        rec.phase = "validated"
    return rec


def _local_handshake(ctx: StepContext, rec: DeployRecord) -> None:
    by_role = {e.role: (e.real if rec.files_already_live else e.temp) for e in rec.files}
    certfile = by_role["cert"]
    combined = None
    if "chain" in by_role:  # the daemon is given the chain separately; OpenSSL wants one file
        cert_bytes = files.read_bytes(by_role["cert"]) or b""
        chain_bytes = files.read_bytes(by_role["chain"]) or b""
        combined = os.path.join(ctx.journal.deploy_dir(rec.target, rec.deploy_id), "handshake-cert.pem")
        files.atomic_write(combined, cert_bytes + chain_bytes, 0o600)
        certfile = combined
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            server.load_cert_chain(certfile, by_role["key"])
        except (ssl.SSLError, OSError) as err:
            raise ValidationFailed(f"the staged cert/key do not load into OpenSSL: {err}") from None
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        served = _memory_handshake(client, server)
        if served != rec.fingerprint:
            raise ValidationFailed("a local handshake with the staged files served another certificate")
    finally:
        if combined:
            with contextlib.suppress(OSError):
                os.unlink(combined)


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
    """Rename each staged temp over its live file (fixed order), fsyncing the dir."""
    rec = ctx.load(deploy_id)
    if _done(rec, "committed"):
        return rec
    if ORDER[rec.phase] < ORDER["validated"]:
        raise CommitFailed(f"deploy {deploy_id} cannot commit from phase {rec.phase!r}")
    with _timed(ctx, rec, "commit"):
        if rec.files_already_live:
            _skip(rec, "commit", "bytes already live")
        else:
            rec.phase = "committing"
            ctx.save(rec)  # from here on, recovery restores the backups
            for e in rec.files:
                try:
                    if os.path.exists(e.temp):
                        files.replace(e.temp, e.real)
                    else:
                        _, live = files.inspect(e.real)
                        if live is None or material.sha256(live) != e.new_sha256:
                            raise CommitFailed(f"{e.role}: staged file {e.temp} is missing")
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
    """Poll the endpoint until it serves the new leaf; the last step, so it finishes
    the deploy as ``deployed``."""
    rec = ctx.load(deploy_id)
    if rec.finished:
        return rec
    if ORDER[rec.phase] < ORDER["reloaded"]:
        raise StepFailed(f"deploy {deploy_id} cannot verify from phase {rec.phase!r}")
    v = ctx.target.post_deploy_verify
    with _timed(ctx, rec, "verify"):
        if not v.enabled:
            _skip(rec, "verify", "post_deploy_verify is off")
        else:
            assert rec.fingerprint
            try:
                served = probe.wait_for(v, rec.fingerprint)
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                raise
            rec.served_fingerprint = served.fingerprint
        rec.phase = "verified"
    return _finish(ctx, rec, "deployed")


# ------------------------------------------------------------------------ rollback
def rollback(ctx: StepContext, deploy_id: str, error: str | None = None,
             reason: str | None = None) -> DeployRecord:
    """Compensate a failed deploy: restore the old bytes exactly, reload, check.

    Converges from any phase and is safe to repeat (recovery runs it after a crash).
    Ends ``rolled_back`` (old set live and, with verify on, served again), ``rejected``
    (nothing was ever committed) or ``failed`` (an operator is needed).
    """
    rec = ctx.load(deploy_id)
    if rec.finished:
        return rec
    failed_steps = [s.detail for s in rec.steps.values() if s.status == "failed" and s.detail]
    original_error = rec.error or error or (failed_steps[-1] if failed_steps else "the deploy failed")
    touched = ORDER[rec.phase] >= ORDER["committing"]
    rec.error = original_error
    rec.phase = "rolling_back"
    ctx.save(rec)
    t = ctx.target
    with _timed(ctx, rec, "rollback"):
        _remove_temps(rec)
        if not touched:
            if reason == "interrupted":
                return _finish(ctx, rec, "rolled_back", original_error, reason)
            return _finish(ctx, rec, "rejected", original_error, reason)
        if rec.files_already_live:
            return _finish(ctx, rec, "failed", _no_older_set(ctx, rec, original_error), reason)
        try:
            _restore(ctx, rec)
        except (OSError, MailTLSError) as err:
            return _finish(ctx, rec, "failed", f"{original_error}; restoring the old files failed: {err}; "
                           + _state_report(ctx, rec), reason)
        try:
            _reload_with_retry(t)
        except MailTLSError as err:
            return _finish(ctx, rec, "failed", f"{original_error}; old files restored but reload failed: {err}; "
                           + _state_report(ctx, rec), reason)
        v = t.post_deploy_verify
        if v.enabled and rec.previous_fingerprint:
            try:
                served = probe.wait_for(v, rec.previous_fingerprint)
                rec.served_fingerprint = served.fingerprint
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                return _finish(ctx, rec, "failed", f"{original_error}; old files restored but not served: {err}",
                               reason)
    return _finish(ctx, rec, "rolled_back", original_error, reason)


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


def _restore(ctx: StepContext, rec: DeployRecord) -> None:
    """Put back every file exactly as it was (bytes, mode, owner), or remove the ones
    that did not exist before. Each restore is its own atomic rename."""
    for e in rec.files:
        if e.existed:
            data = ctx.journal.read_backup(rec.target, rec.deploy_id, e.role)
            if data is None or material.sha256(data) != e.old_sha256:
                raise DeployFailed(f"{e.role}: backup of {e.real} is missing or corrupt")
            _, live = files.inspect(e.real)
            st, _ = files.inspect(e.real)
            if live is not None and material.sha256(live) == e.old_sha256 and st.mode == e.old_mode \
                    and st.uid == e.old_uid and st.gid == e.old_gid:
                continue
            assert e.old_mode is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.temp)
            files.write_new(e.temp, data, e.old_mode, e.old_uid, e.old_gid)
            files.replace(e.temp, e.real)
        else:
            files.remove(e.real)


def _state_report(ctx: StepContext, rec: DeployRecord) -> str:
    """What is on disk and what is served: the facts an operator needs first."""
    parts = []
    cert = files.read_bytes(files.real_path(ctx.target.cert_path))
    key = files.read_bytes(files.real_path(ctx.target.key_path))
    leaf = material.leaf_of_file(cert) if cert else None
    on_disk = material.fingerprint(leaf) if leaf else "none"
    which = ("new" if on_disk == rec.fingerprint else "old" if on_disk == rec.previous_fingerprint else "other")
    match = material.key_matches_cert(key, cert) if cert and key else False
    parts.append(f"on disk: {on_disk} ({which} set, key {'matches' if match else 'DOES NOT match'})")
    v = ctx.target.post_deploy_verify
    if v.enabled:
        try:
            parts.append(f"served: {probe.probe_settings(v).fingerprint}")
        except probe.ProbeError as err:
            parts.append(f"served: unknown ({err})")
    return "; ".join(parts)


def _no_older_set(ctx: StepContext, rec: DeployRecord, error: str | None) -> str:
    return (f"{error}; the new files were already on disk before this deploy, so there is no older "
            f"set to return to; " + _state_report(ctx, rec))


# ------------------------------------------------------------------------ recovery
def recover(contexts: dict[str, StepContext], journal: Journal, skip_locked: bool = True) -> list[DeployRecord]:
    """Roll back every unfinished deploy whose owner died (its target lock is free).

    Called on worker start and before every local run. Returns what it finished.
    """
    done = []
    for name in journal.targets():
        pending = journal.unfinished(name)
        if not pending:
            continue
        ctx = contexts.get(name)
        if ctx is None:
            continue  # target no longer configured: leave the journal for an operator
        try:
            with journal.lock(name, timeout=0.0):
                for rec in pending:
                    done.append(rollback(ctx, rec.deploy_id,
                                         error="the deploy was interrupted before it finished",
                                         reason="interrupted"))
        except MailTLSError:
            if not skip_locked:
                raise
    return done
