"""Step 5, verify: every listener serves the new leaf, with the chain deployed; the
deploy ends ``deployed``. And recovery's roll-forward, which ends a dead deploy the
same way when a fresh look proves the new set is live and served."""

from __future__ import annotations

from ...errors import StepFailed, VerifyFailed
from .. import probe
from ..journal import DeployRecord
from .context import StepContext
from .live import holds_new
from .phases import ORDER, finish, moving_forward, skip, timed
from .served import default_served, served_now, wait_served


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
    with timed(ctx, rec, "verify"):
        if not t.verify_endpoints():
            skip(rec, "verify", "post_deploy_verify is off")
        else:
            try:
                served = wait_served(t, rec.leaves or {"any": rec.fingerprint or ""}, rec.chains)
            except VerifyFailed as err:
                rec.served_fingerprint = err.served
                raise
            rec.served_fingerprint = served
            _check_default_kept(ctx, rec)
        rec.phase = "verified"
        if ctx.batch is None:
            finish(ctx, rec, "deployed")
    # a batch's member is finished by the batch, once it has decided how each one ends
    return rec


def _check_default_kept(ctx: StepContext, rec: DeployRecord) -> None:
    """An SNI target that is not the default: each listener serves, without SNI, the
    certificate it served at stage (the default's, which this deploy is not)."""
    for li in ctx.target.default_listeners():
        before = rec.default_served.get(li.endpoint)
        if before is None:
            continue  # stage could not see it: nothing to compare with
        try:
            now = default_served(ctx, li)
        except probe.ProbeError as err:
            raise VerifyFailed(f"{li.where} (no SNI, the default certificate): {err}") from None
        if now != before:
            raise VerifyFailed(f"{li.where} serves another default certificate (no SNI) since this deploy of an "
                               f"SNI name: {now[:16]}…, was {before[:16]}…", served=now)


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
        served = served_now(t, leaves)
        if any(served.get(kind) != fp for kind, fp in leaves.items()):
            return None
    with timed(ctx, rec, "verify"):
        if t.verify_endpoints():
            rec.served_fingerprint = rec.fingerprint
        else:
            skip(rec, "verify", "post_deploy_verify is off")
        rec.phase = "verified"
        finish(ctx, rec, "deployed", reason="recovered")
    return rec
