"""Step 4, reload: the daemon reads the committed files (the target's
``reload_command``, run by its daemon module)."""

from __future__ import annotations

from ...errors import CommandFailed, StepFailed
from ..journal import DeployRecord
from .context import StepContext
from .phases import ORDER, past, skip, timed


def reload(ctx: StepContext, deploy_id: str) -> DeployRecord:
    rec = ctx.load(deploy_id)
    if past(rec, "reloaded"):
        return rec
    if ORDER[rec.phase] < ORDER["committed"]:
        raise StepFailed(f"deploy {deploy_id} cannot reload from phase {rec.phase!r}")
    with timed(ctx, rec, "reload"):
        t = ctx.target
        once = t.reload_once
        if ctx.batch is not None and once in ctx.batch.reloaded:
            # every member was committed before the first reload: that one read them all
            skip(rec, "reload", f"reloaded once for the batch ({t.reload_command or t.reload_what})")
        else:
            res = t.reload()
            if not res.ok:
                raise CommandFailed(f"{t.reload_what} failed: {res.summary()}")
            if ctx.batch is not None:
                ctx.batch.reloaded.add(once)
                ctx.batch.default_now.clear()  # what was served before is not what is served now
        rec.phase = "reloaded"
    return rec
