"""The embedded runner: the very same steps in-process, no broker.

Meant for a certbot/acme.sh deploy hook on the mail host itself. It holds the locks
of the target's real files for the whole run, so recovery (which runs first and
finishes any dead deploy on the host) and every other runner can tell it is alive.
SIGTERM and Ctrl-C roll the deploy back before the process exits; SIGKILL leaves it
to the next recovery.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import FrameType

from ..commands import Running
from ..errors import MailTLSError, Rejected
from ..ids import check_deploy_id, new_deploy_id
from . import material
from .config import HostConfig
from .journal import DeployRecord, Journal, Owner
from .notices import notify_local
from .ownership import holding
from .recovery import recover, recover_deploy
from .result import DeployResult
from .steps.commit import commit
from .steps.context import HostContexts, StepContext, target_reals
from .steps.reload import reload
from .steps.rollback import rollback
from .steps.stage import stage
from .steps.validate import validate
from .steps.verify import verify

log = logging.getLogger("mailtls.local")

TRANSIENT_ATTEMPTS = 3


class Terminated(BaseException):
    """SIGTERM arrived during a local run (a BaseException, like KeyboardInterrupt)."""


def contexts_for(cfg: HostConfig, journal: Journal | None = None) -> HostContexts:
    return HostContexts(cfg, journal or Journal(cfg.state_dir))


def recover_host(cfg: HostConfig, *, journal: Journal | None = None, full_scan: bool = True,
                 force: bool = False, boot: bool = False) -> list[DeployRecord]:
    """Finish every dead deploy on this host (``force``: every unfinished one;
    ``boot``: before the daemons start, see ``steps.rollback.rollback``)."""
    contexts = contexts_for(cfg, journal)
    return recover(contexts, contexts.journal, full_scan=full_scan, force=force, boot=boot)


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


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated (SIGINT already raises KeyboardInterrupt), so
    the run can compensate before exiting: a closed SSH session must not end a deploy
    half-way either. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """While compensating, a second SIGTERM, SIGHUP or Ctrl-C must not abort the rollback
    half-way (SIGKILL still can: recovery finishes it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_local(cfg: HostConfig, target: str, cert_pem: bytes, key_pem: bytes,
              chain_pem: bytes | None = None, *, force: bool = False,
              deploy_id: str | None = None, lock_timeout: float = 300.0,
              journal: Journal | None = None,
              also: list[tuple[bytes, bytes, bytes | None]] | None = None,
              early_validate: Running | None = None) -> DeployResult:
    """Deploy in-process and return the result; never raises for a deploy that ran.
    ``also``: the second certificate of a dual RSA + ECDSA target (cert, key, chain).
    ``early_validate``: the target's validate_command already started by the caller
    (see ``StepContext``); killed if the deploy ends without needing it.

    Waits up to ``lock_timeout`` for another live deploy owning one of the target's
    files to end; then raises TargetBusy (exit 1, nothing touched), naming it."""
    try:
        rec = _run(cfg, target, cert_pem, key_pem, chain_pem, force, deploy_id, lock_timeout, journal, also,
                   early_validate)
    finally:
        if early_validate is not None:
            early_validate.cancel()
    result = DeployResult.from_record(rec)
    result.notes += notify_local(cfg, rec)  # after the deploy has ended: it cannot change it
    return result


def _run(cfg: HostConfig, target: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None, force: bool,
         deploy_id: str | None, lock_timeout: float, journal: Journal | None,
         also: list[tuple[bytes, bytes, bytes | None]] | None, early_validate: Running | None) -> DeployRecord:
    t = cfg.target(target)
    deploy_id = check_deploy_id(deploy_id or new_deploy_id())
    contexts = contexts_for(cfg, journal)
    ctx = replace(contexts[t.name], early_validate=early_validate)
    certs = [cert_pem, *(c for c, _, _ in also or [])]
    check_id_reuse(ctx.journal, t.name, deploy_id, certs)  # before waiting for locks it would not need
    recover(contexts, ctx.journal)

    def take_over(owner: Owner) -> None:
        recover_deploy(contexts, ctx.journal, owner.target, owner.deploy_id)

    def waiting(why: str) -> None:
        log.warning("waiting up to %gs: %s", lock_timeout, why)

    with signals_as_exceptions(), holding(ctx.journal, target_reals(t), deploy_id, timeout=lock_timeout,
                                           recover=take_over, on_wait=waiting, target=t.name):
        check_id_reuse(ctx.journal, t.name, deploy_id, certs)  # again: a worker may have staged it meanwhile
        try:
            rec = stage(ctx, deploy_id, cert_pem, key_pem, chain_pem, force=force, also=also)
            for step in (validate, commit, reload, verify):
                if rec.finished:
                    break
                rec = _retrying(step, ctx, deploy_id)
        except MailTLSError as err:
            existing = ctx.journal.load(t.name, deploy_id)
            if existing is None:
                raise  # nothing was recorded, so nothing was touched: e.g. the journal's disk is full
            rec = existing if existing.finished else _compensate(ctx, deploy_id, str(err))
        except Exception as err:
            log.exception("deploy %s: unexpected error; rolling back", deploy_id)
            rec = _compensate(ctx, deploy_id, f"internal error: {type(err).__name__}: {err}")
        except (KeyboardInterrupt, Terminated):
            if ctx.journal.load(t.name, deploy_id) is not None:
                _compensate(ctx, deploy_id, "interrupted by a signal", reason="interrupted")
            raise
    return rec


def check_id_reuse(journal: Journal, target: str, deploy_id: str, certs: list[bytes]) -> None:
    """An id names one deploy of one bundle. Run again with the same certificates, it
    converges (its recorded result; after a crash, recovery's ending). Other
    certificates under that id, or a distributed deploy's id, are refused before
    anything is touched: the first would report the old deploy as this one (a certbot
    hook with a fixed id: exit 0 forever); the second would run the steps of a deploy
    its worker owns, or roll it back on a failure of its own."""
    rec = journal.load(target, deploy_id)
    if rec is None:
        return
    if rec.origin != "local":
        state = f"ended {rec.outcome}" if rec.finished else f"in phase {rec.phase}"
        raise Rejected(f"deploy id {deploy_id} is a distributed deploy of target {target!r} ({state}); a local "
                       "run cannot take it over: leave out --deploy-id, or give a new one")
    if rec.input_sha256 is not None:
        same = rec.input_sha256 == material.input_digest(certs)
    else:  # a record from before input_sha256: judged by its leaves
        known = set(rec.leaves.values()) or ({rec.fingerprint} if rec.fingerprint else set())
        leaves = {material.leaf_of_file(c) for c in certs}
        same = not known or {material.fingerprint(x) for x in leaves if x is not None} == known
    if not same:
        raise Rejected(f"deploy id {deploy_id} was already used for other certificates (that deploy ended "
                       f"{rec.outcome or 'unfinished'}); an id names one bundle: leave out --deploy-id, or give a "
                       "new one")


def _compensate(ctx: StepContext, deploy_id: str, error: str, reason: str | None = None) -> DeployRecord:
    """Roll back, shielded from a second SIGTERM or Ctrl-C. If even that fails (a full
    disk), hand the deploy over to recovery: without a runner it is dead at once, so
    a long-lived caller of run_local does not keep its files owned."""
    with shielded():
        try:
            return rollback(ctx, deploy_id, error=error, reason=reason)
        except BaseException:
            rec = ctx.journal.load(ctx.target.name, deploy_id)
            if rec is not None and not rec.finished:
                rec.runner = None
                rec.in_step = None
                with contextlib.suppress(MailTLSError):
                    ctx.save(rec)
            raise
