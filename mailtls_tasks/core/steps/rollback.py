"""Step 6, rollback: the compensation after a failed commit, reload or verify.
Restores the old files byte-exact (modes and owners too), reloads, and checks the old
leaf is served again; converges after any number of crashes."""

from __future__ import annotations

import contextlib
import os
import time

from ...errors import CommandFailed, CommandTimeout, DeployFailed, MailTLSError, VerifyFailed
from .. import files, material, probe
from ..config import Target
from ..journal import DeployRecord, FileEntry
from .context import StepContext
from .live import LiveState, describe_live, live_state
from .phases import ORDER, finish, remove_temps, timed
from .served import wait_served

RESTORE_ATTEMPTS = 3


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
    with timed(ctx, rec, "rollback"):
        remove_temps(rec)
        if ORDER[started_from] < ORDER["committing"]:
            outcome = "rolled_back" if reason == "interrupted" else "rejected"
            return finish(ctx, rec, outcome, original_error, reason)
        if rec.files_already_live:
            return finish(ctx, rec, "failed", _no_older_set(ctx, rec, original_error), reason)
        states = {e.real: live_state(e) for e in rec.files}
        if any(s == "other" for s in states.values()):
            return finish(ctx, rec, "failed",
                           f"{original_error}; conflict: a live file holds neither the old nor this deploy's new "
                           f"bytes ({describe_live(rec, states)}), so nothing was restored; "
                           + _state_report(ctx, rec), "conflict")
        try:
            _restore(ctx, rec, states)
        except (OSError, MailTLSError) as err:
            return finish(ctx, rec, "failed", f"{original_error}; restoring the old files failed: {err}; "
                           + _state_report(ctx, rec), reason)
        try:
            _reload_with_retry(t)
        except MailTLSError as err:
            if boot:
                return finish(ctx, rec, "rolled_back", f"{original_error}; old files restored at boot, before "
                               f"{t.mode} started (reload: {err}): it starts on them", reason)
            return finish(ctx, rec, "failed", f"{original_error}; old files restored but reload failed: {err}; "
                           + _state_report(ctx, rec), reason)
        previous = rec.previous_leaves or ({"any": rec.previous_fingerprint} if rec.previous_fingerprint else {})
        if t.verify_endpoints() and previous and len(previous) == len(t.slots()):
            try:
                rec.served_fingerprint = wait_served(t, previous, None)
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                return finish(ctx, rec, "failed", f"{original_error}; old files restored but not served: {err}",
                               reason)
        finish(ctx, rec, "rolled_back", original_error, reason)
    return rec


def _reload_with_retry(t: Target, attempts: int = 2) -> None:
    for i in range(attempts):
        try:
            res = t.reload()
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
            parts.append(f"served on {li.where}: {probe.probe_listener(li).fingerprint}")
        except probe.ProbeError as err:
            parts.append(f"served on {li.where}: unknown ({err})")
    return "; ".join(parts)


def _no_older_set(ctx: StepContext, rec: DeployRecord, error: str | None) -> str:
    return (f"{error}; the new files were already on disk before this deploy, so there is no older "
            f"set to return to; " + _state_report(ctx, rec))
