"""The embedded runner: the very same steps in-process, under the host lock, no broker.

Meant for a certbot/acme.sh deploy hook on the mail host itself. Recovery runs
first, so a previous run that was killed mid-deploy is rolled back before anything
new is attempted.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable

from .config import HostConfig
from .errors import MailTLSError, Rejected
from .journal import DeployRecord, Journal, check_deploy_id
from .result import DeployResult
from .steps import StepContext, commit, recover, reload, rollback, stage, validate, verify

log = logging.getLogger("mailtls.local")

TRANSIENT_ATTEMPTS = 3


def new_deploy_id() -> str:
    """Sortable, unique, and safe as a file name."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(5)}"


def contexts_for(cfg: HostConfig) -> dict[str, StepContext]:
    journal = Journal(cfg.state_dir)
    return {name: StepContext(t, journal, cfg.host) for name, t in cfg.targets.items()}


def recover_host(cfg: HostConfig) -> list[DeployRecord]:
    """Roll back every interrupted deploy on this host whose owner is gone."""
    journal = Journal(cfg.state_dir)
    finished = recover(contexts_for(cfg), journal)
    for rec in finished:
        log.warning("recovered interrupted deploy %s of %s: %s", rec.deploy_id, rec.target, rec.outcome)
    return finished


def _retrying(step: Callable[[StepContext, str], DeployRecord], ctx: StepContext, deploy_id: str) -> DeployRecord:
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        try:
            return step(ctx, deploy_id)
        except MailTLSError as err:
            if not err.transient or attempt == TRANSIENT_ATTEMPTS:
                raise
            log.warning("%s of %s: transient error, retrying: %s", step.__name__, deploy_id, err)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def run_local(cfg: HostConfig, target: str, cert_pem: bytes, key_pem: bytes,
              chain_pem: bytes | None = None, *, force: bool = False,
              deploy_id: str | None = None, lock_timeout: float = 300.0) -> DeployResult:
    """Deploy in-process and return the result; never raises for a deploy that ran."""
    t = cfg.target(target)
    deploy_id = check_deploy_id(deploy_id or new_deploy_id())
    contexts = contexts_for(cfg)
    ctx = contexts[t.name]
    recover(contexts, ctx.journal)
    with ctx.journal.lock(t.name, timeout=lock_timeout):
        try:
            rec = stage(ctx, deploy_id, cert_pem, key_pem, chain_pem, force=force)
            for step in (validate, commit, reload, verify):
                if rec.finished:
                    break
                rec = _retrying(step, ctx, deploy_id)
        except Rejected:
            rec = ctx.load(deploy_id)
            if not rec.finished:
                rec = rollback(ctx, deploy_id, error=rec.error)
        except MailTLSError as err:
            rec = rollback(ctx, deploy_id, error=str(err))
        except Exception as err:
            log.exception("deploy %s: unexpected error; rolling back", deploy_id)
            rec = rollback(ctx, deploy_id, error=f"internal error: {type(err).__name__}: {err}")
        except BaseException:
            # Ctrl-C / SIGTERM: compensate now rather than leave it for recovery.
            rollback(ctx, deploy_id, error="interrupted by a signal", reason="interrupted")
            raise
    return DeployResult.from_record(rec)
