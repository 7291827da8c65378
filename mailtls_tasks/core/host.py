"""One mail host's side of a distributed deploy: steps under the host lock.

The Celery tasks call this and nothing below it, so the Celery layer never touches
a file: it passes names (target, deploy id, step) and gets journal records back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ConfigError, Rejected, UnknownTarget
from ..ids import check_deploy_id
from ..security.envelope import EnvelopeError, open_envelope
from ..security.keys import load_host_key, parse_ed25519_public
from . import files, material
from .audit import TargetAudit, audit_target
from .config import HostConfig
from .journal import DeployRecord, Journal, Owner
from .ownership import busy_message, holding
from .recovery import recover, recover_deploy
from .steps.commit import commit
from .steps.context import HostContexts, StepContext, target_reals
from .steps.phases import already_staged
from .steps.reload import reload
from .steps.rollback import rollback as rollback_step
from .steps.stage import RawBundle
from .steps.stage import stage as stage_step
from .steps.validate import validate
from .steps.verify import verify

if TYPE_CHECKING:
    from .batch import Member


@dataclass(frozen=True, repr=False)
class HostKeys:
    host_keys: list[X25519PrivateKey]
    trusted: list[Ed25519PublicKey]
    max_age: float

    def __repr__(self) -> str:
        return f"<HostKeys {len(self.host_keys)} host key(s), {len(self.trusted)} trusted signer(s)>"


STEP_FUNCTIONS = {
    "validate": validate,
    "commit": commit,
    "reload": reload,
    "verify": verify,
}


def why(rec: DeployRecord) -> str | None:
    """One line on why a deploy ended as it did, for the fleet table: an operator who
    sees ``rejected`` or ``unchanged`` right after a deploy should not have to dig."""
    if rec.reason or rec.error:
        text = (rec.reason or rec.error or "").splitlines()[0]
        return text if len(text) <= 160 else text[:159] + "…"
    if rec.outcome == "unchanged":
        detail = next((s.detail for s in rec.steps.values() if s.status == "skipped" and s.detail), None)
        return detail or "this set was already deployed and served"
    commit = rec.steps.get("commit")
    if rec.outcome == "deployed" and commit is not None and commit.status == "skipped":
        return (f"{commit.detail or 'files already held this set'} (written by a deploy through a target sharing "
                "them); reloaded and verified")
    return None


class HostRuntime:
    """The worker host's config, journal and step contexts."""

    def __init__(self, cfg: HostConfig, lock_wait: float = 2.0, journal: Journal | None = None) -> None:
        # lock_wait is short on purpose: a worker runs one message at a time, and a target
        # held by a local run must not stall every other target's messages; the step is
        # retried with backoff instead (within busy_retries).
        self.cfg = cfg
        self.journal = journal or Journal(cfg.state_dir)
        self.contexts = HostContexts(cfg, self.journal)
        self.lock_wait = lock_wait
        self._keys: HostKeys | None = None

    @property
    def host(self) -> str:
        return self.cfg.host

    def security(self) -> HostKeys:
        """This host's keys and trusted signers, loaded once (the worker loads them at
        start; rotating them means a restart, as the README says). Distributed mode
        refuses to start without them, saying how to create them."""
        if self._keys is not None:
            return self._keys
        sec = self.cfg.security
        if sec is None:
            raise ConfigError(
                f"{self.cfg.source}: no [security] section. Distributed deploys are encrypted for this host and "
                "signed by your pipeline. Create a host key with `mailtls keys init-host --out "
                "/etc/mailtls/host.key`, the pipeline's with `mailtls keys init-pipeline`, then add\n"
                "  [security]\n  host_keys = [\"/etc/mailtls/host.key\"]\n"
                "  trusted_signers = [\"ed25519:…\"]   # from `mailtls keys public pipeline.key`\n"
                "(--local deploys need none of this)")
        self._keys = HostKeys([load_host_key(p) for p in sec.host_keys],
                              [parse_ed25519_public(s, "trusted_signers") for s in sec.trusted_signers],
                              sec.max_envelope_age)
        return self._keys

    def stage_envelope(self, target: str, deploy_id: str, envelope: Any,
                       *, fence: int | None = None) -> DeployRecord:
        """Open the sealed bundle (refusing anything not signed by a trusted pipeline for
        exactly this target, host and deploy) and stage it under the fence from its
        signed header. ``fence``: what the message claimed, if anything; it must agree
        with the header and is never used otherwise."""
        keys = self.security()
        existing = self.record(target, deploy_id)
        if already_staged(existing):
            return existing  # redelivered: its envelope may be past max age by now, and that is fine
        opened = open_envelope(envelope, target=target, host=self.host, deploy_id=deploy_id, fence=fence,
                               host_keys=keys.host_keys, trusted=keys.trusted, max_age=keys.max_age)
        return self.stage(target, deploy_id, opened.cert, opened.key, opened.chain, force=opened.force,
                          fence=opened.fence, also=list(opened.also))

    def check_envelope(self, target: str, check_id: str, envelope: Any) -> Any:
        """Check mode through the worker: open the sealed bundle as ``stage_envelope``
        does (signed by a trusted pipeline for exactly this target, host and id) and
        run ``core.check`` on it: nothing written, no lock, no journal entry."""
        from .check import check

        keys = self.security()
        if envelope is None:
            raise EnvelopeError(f"check {check_id}: its envelope is gone from Redis (expired, or Redis lost its "
                                "data)")
        opened = open_envelope(envelope, target=target, host=self.host, deploy_id=check_id,
                               host_keys=keys.host_keys, trusted=keys.trusted, max_age=keys.max_age)
        return check(self.cfg, target, opened.cert, opened.key, opened.chain, force=opened.force,
                     also=list(opened.also))

    def context(self, target: str) -> StepContext:
        self.cfg.target(target)  # UnknownTarget with a clear message
        return self.contexts[target]

    def record(self, target: str, deploy_id: str) -> DeployRecord | None:
        self.context(target)
        return self.journal.load(target, check_deploy_id(deploy_id))

    def _take_over(self, owner: Owner) -> None:
        recover_deploy(self.contexts, self.journal, owner.target, owner.deploy_id)

    def stage(self, target: str, deploy_id: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None,
              *, force: bool, fence: int | None, also: list[RawBundle] | None = None) -> DeployRecord:
        ctx = self.context(target)
        with holding(self.journal, target_reals(ctx.target), deploy_id, timeout=self.lock_wait,
                     recover=self._take_over, target=target, wait_for_owner=False):
            return stage_step(ctx, deploy_id, cert_pem, key_pem, chain_pem, force=force, fence=fence,
                               origin="distributed", also=also)

    def open_batch(self, members: list[tuple[str, str, Any]]) -> tuple[list[Member], dict[str, str]]:
        """The members of a batch sent through the workers, ready to run: ``members``
        are (target, deploy id, sealed envelope or None); each envelope is opened as
        ``stage_envelope`` opens one (signed for exactly this target, host and deploy).
        Returns the members to run and, by deploy id, why the others were refused
        (nothing touched). A member already past staging (the batch sent again after
        a lost worker) goes on from its record: its envelope may be gone, or past its
        age, and it is never staged again (``Member.taken``)."""
        from .batch import Member  # a worker loads the batch code with its first batch, not before

        keys = self.security()
        chosen: list[Member] = []
        refused: dict[str, str] = {}
        for name, deploy_id, envelope in members:
            try:
                if already_staged(self.record(name, deploy_id)):
                    chosen.append(Member(name, b"", b"", deploy_id=deploy_id, taken=True))
                    continue
                if envelope is None:
                    raise EnvelopeError(f"deploy {deploy_id}: its envelope is gone from Redis (expired, or Redis "
                                        "lost its data); nothing was touched")
                opened = open_envelope(envelope, target=name, host=self.host, deploy_id=deploy_id,
                                       host_keys=keys.host_keys, trusted=keys.trusted, max_age=keys.max_age)
            except (Rejected, UnknownTarget, ConfigError) as err:  # EnvelopeError is a Rejected
                refused[deploy_id] = str(err)
                continue
            chosen.append(Member(name, opened.cert, opened.key, opened.chain, tuple(opened.also),
                                 deploy_id=deploy_id, fence=opened.fence, force=opened.force))
        return chosen, refused

    def run_batch(self, batch_id: str, members: list[Member]) -> dict[str, DeployRecord | None]:
        """Run ``open_batch``'s members as one batch (``core.batch``), each under the
        fence from its own signed header; their records, by deploy id. TargetBusy
        (nothing touched) while another live deploy owns a member's files, or an
        earlier run of this batch still runs."""
        from .batch import run_batch

        if members:
            run_batch(self.cfg, members, deploy_id=batch_id, lock_timeout=self.lock_wait, journal=self.journal,
                      origin="distributed", wait_for_owner=False)
        out: dict[str, DeployRecord | None] = {}
        for m in members:
            assert m.deploy_id is not None
            out[m.deploy_id] = self.journal.load(m.target, m.deploy_id)
        return out

    def _locked(self, target: str, deploy_id: str) -> tuple[StepContext, DeployRecord]:
        ctx = self.context(target)
        return ctx, ctx.load(deploy_id)

    def step(self, name: str, target: str, deploy_id: str) -> DeployRecord:
        ctx, rec = self._locked(target, deploy_id)
        with self.journal.lock_files(rec.reals, self.lock_wait, busy=lambda r: busy_message(self.journal, r)):
            return STEP_FUNCTIONS[name](ctx, deploy_id)

    def rollback(self, target: str, deploy_id: str, error: str | None = None,
                 reason: str | None = None) -> DeployRecord:
        ctx, rec = self._locked(target, deploy_id)
        with self.journal.lock_files(rec.reals, self.lock_wait, busy=lambda r: busy_message(self.journal, r)):
            return rollback_step(ctx, deploy_id, error=error, reason=reason)

    def recover(self, *, full_scan: bool = False) -> list[DeployRecord]:
        return recover(self.contexts, self.journal, full_scan=full_scan)

    def inventory_entry(self, name: str) -> dict[str, Any]:
        """What this host says of one target in the fleet registry: public facts only."""
        t = self.cfg.targets[name]
        cert = files.read_bytes(files.real_path(t.leaf_file()))
        leaf = material.leaf_of_file(cert) if cert else None
        last = self.journal.last_finished(name)
        return {
            "target": name,
            "host": self.host,
            "mode": t.mode,
            "cert_path": t.cert_path,
            "key_path": t.key_path,
            "chain_path": t.chain_path,
            "combined_path": t.combined_path,
            "alt_cert_path": (t.alt.combined_path or t.alt.cert_path) if t.alt else None,
            "names": list(t.names),
            "labels": list(t.labels),
            "verify_endpoints": [v.endpoint for v in t.verify_endpoints()],
            "fingerprint_sha256": material.fingerprint(leaf) if leaf else None,
            "not_after": leaf.not_valid_after_utc.isoformat() if leaf else None,
            "last_outcome": last.outcome if last else None,
            "last_reason": why(last) if last else None,
            "last_deploy_id": last.deploy_id if last else None,
            "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def inventory(self) -> dict[str, dict[str, Any]]:
        return {name: self.inventory_entry(name) for name in self.cfg.targets}

    def audit(self) -> list[TargetAudit]:
        """Audit every target not in the middle of a deploy (its files and daemon are
        legitimately out of step until the deploy ends: its previous audit stands)."""
        busy = {o.target for o in self.journal.owners()}
        return [audit_target(t, self.journal, self.host, warn_days=self.cfg.warn_days)
                for t in self.cfg.targets.values() if t.name not in busy]
