"""Step 3, commit: rename each staged temp over its live file, compare-and-swap on
what stage saw there."""

from __future__ import annotations

from ...errors import CommitFailed, Conflict
from .. import files, material
from ..journal import DeployRecord, StepRecord
from .context import StepContext
from .live import describe_live, live_state
from .phases import ORDER, finish, past, remove_temps, skip, timed


def commit(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Rename each staged temp over its live file (fixed order), fsyncing the dir.

    Compare-and-swap: a live file must still hold the bytes stage snapshotted (or,
    when a commit runs again after dying half-way, this deploy's new bytes), and each
    temp is re-hashed before its rename. A file changed behind our back ends the
    deploy ``rejected`` (reason ``conflict``) if nothing of ours is live yet."""
    rec = ctx.load(deploy_id)
    if past(rec, "committed"):
        return rec
    if ORDER[rec.phase] < ORDER["validated"]:
        raise CommitFailed(f"deploy {deploy_id} cannot commit from phase {rec.phase!r}")
    with timed(ctx, rec, "commit"):
        if rec.files_already_live:
            skip(rec, "commit", "bytes already live")
        else:
            states = {e.real: live_state(e) for e in rec.files}
            allowed = ("old",) if rec.phase == "validated" else ("old", "new")
            if any(s not in allowed for s in states.values()):
                what = describe_live(rec, states)
                if rec.phase == "validated":
                    remove_temps(rec)
                    msg = (f"conflict: the live files changed since stage ({what}); "
                           "nothing was replaced")
                    rec.steps["commit"] = StepRecord(status="failed", detail=msg)
                    finish(ctx, rec, "rejected", msg, "conflict")
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
            for e in rec.files:
                for path in e.scratch:  # the temp source of an SNI table: done with
                    files.remove(path)
        rec.phase = "committed"
    return rec
