"""The bookkeeping every step shares: where a deploy is in its phases, the step
marked running while it acts, its time and status recorded, and the one way a deploy
ends (``finish``: outcome recorded, files released, an outbox entry for Redis).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Literal, TypeGuard

from ...errors import MailTLSError
from .. import files
from ..journal import DeployRecord, Phase, StepRecord
from .context import StepContext

ORDER: dict[Phase, int] = {
    "staging": 0, "staged": 1, "validated": 2, "committing": 3, "committed": 4,
    "reloaded": 5, "verified": 6, "rolling_back": 7, "done": 8,
}


def begin(ctx: StepContext, rec: DeployRecord, name: str) -> None:
    """Mark the step as running (and renew the lease) before doing anything to files."""
    rec.in_step = name
    rec.runner = ctx.journal.token()
    if rec.origin == "distributed":
        rec.lease_until = ctx.journal.clock() + ctx.lease
    ctx.save(rec)


@contextlib.contextmanager
def timed(ctx: StepContext, rec: DeployRecord, name: str) -> Iterator[None]:
    """Record the step's status and duration in the journal, whatever happens.

    A process that dies inside leaves ``in_step`` set: that is how recovery knows it
    died mid-step. An exception (the process lives on) clears it.
    """
    begin(ctx, rec, name)
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


def skip(rec: DeployRecord, name: str, detail: str) -> None:
    rec.steps[name] = StepRecord(status="skipped", ms=0, detail=detail)


def already_staged(rec: DeployRecord | None) -> TypeGuard[DeployRecord]:
    """Stage ran to the end for this deploy (or the deploy is over): a redelivered
    stage must return the record, never stage again or re-judge its input."""
    return rec is not None and (rec.finished or rec.phase != "staging")


def moving_forward(rec: DeployRecord) -> bool:
    """Forward steps may act: the deploy is neither finished nor rolling back."""
    return not rec.finished and rec.phase != "rolling_back"


def past(rec: DeployRecord, phase_at_least: Phase) -> bool:
    return not moving_forward(rec) or ORDER[rec.phase] >= ORDER[phase_at_least]


def finish(ctx: StepContext, rec: DeployRecord, outcome: str, error: str | None = None,
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


def temp_for(real: str, deploy_id: str) -> str:
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.mailtls-{deploy_id}.tmp")


def remove_temps(rec: DeployRecord) -> None:
    for f in rec.files:
        for path in (f.temp, *f.scratch):
            with contextlib.suppress(OSError):
                files.remove(path)
