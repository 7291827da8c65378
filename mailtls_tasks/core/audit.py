"""Drift audit: what each target serves, compared with what is on disk and what was deployed.

Nobody looks at a certificate between its deploy and its expiry. The audit does, on
every worker every ``audit_interval``: for each target it probes every listener it
verifies, and records

* the leaf served on each listener, the leaf on disk, and the leaf last deployed --
  served != on disk is a daemon never reloaded (or reading other files); on disk !=
  last deployed is a file changed by hand behind the journal's back;
* days until the on-disk leaf's notAfter;
* whether the served chain verifies to the system trust store (or the target's
  ``trust_anchors`` CA file) for each of the target's ``names``, exactly as a client
  checking the name would.

``status``: ``critical`` (drift, a broken chain, expired, a listener down), ``warning``
(expires within ``warn_days``) or ``ok``. No Celery here: the worker schedules it and
publishes the result; ``mailtls audit`` prints the fleet's.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from cryptography import x509
from pydantic import BaseModel, Field

from ..errors import MaterialError
from . import files, material, probe
from .config import Listener, Target
from .journal import Journal, now_iso
from .names import validation_names

Status = Literal["ok", "warning", "critical"]
SEVERITY: dict[str, int] = {"ok": 0, "warning": 1, "critical": 2}


class ListenerAudit(BaseModel):
    endpoint: str
    protocol: str
    served_fingerprint: str | None = None
    served_not_after: str | None = None
    error: str | None = None
    chain: dict[str, str] = Field(default_factory=dict)  # name -> "ok" or why not


class TargetAudit(BaseModel):
    target: str
    host: str
    at: str = Field(default_factory=now_iso)
    status: Status = "ok"
    issues: list[str] = Field(default_factory=list)
    on_disk_fingerprint: str | None = None
    last_deployed_fingerprint: str | None = None
    last_deploy_id: str | None = None
    not_after: str | None = None
    days_left: float | None = None
    drift: bool = False
    listeners: list[ListenerAudit] = Field(default_factory=list)

    def worse(self, status: Status, issue: str) -> None:
        self.issues.append(issue)
        if SEVERITY[status] > SEVERITY[self.status]:
            self.status = status


def audit_target(t: Target, journal: Journal, host: str, *, warn_days: float,
                 now: dt.datetime | None = None) -> TargetAudit:
    """Probe and compare one target; never raises for what it finds (that is the result).

    A dual RSA + ECDSA target is audited per certificate: each slot's file on disk,
    and each listener probed once per algorithm (a client offering only RSA gets the
    RSA leaf); the fingerprints and days shown are the primary slot's, ``days_left``
    the nearer expiry of the two."""
    now = now or dt.datetime.now(dt.UTC)
    out = TargetAudit(target=f"{host}/{t.name}", host=host)
    slots = t.slots()
    dual = len(slots) > 1
    last = next((r for r in reversed(journal.records(t.name)) if r.outcome in ("deployed", "unchanged")), None)
    if last is not None:
        out.last_deployed_fingerprint, out.last_deploy_id = last.fingerprint, last.deploy_id
    on_disk: dict[str, str] = {}
    for i, (_, kind, cert_path, _, _, combined) in enumerate(slots):
        path = combined or cert_path
        what = f"{path} ({kind.upper()})" if dual else path
        cert = files.read_bytes(files.real_path(path))
        leaf = material.leaf_of_file(cert) if cert else None
        if leaf is None:
            out.worse("critical", f"no readable certificate at {what}")
            continue
        fp = on_disk[kind] = material.fingerprint(leaf)
        days = round((leaf.not_valid_after_utc - now).total_seconds() / 86400, 2)
        if i == 0:
            out.on_disk_fingerprint = fp
            out.not_after = leaf.not_valid_after_utc.isoformat()
        if out.days_left is None or days < out.days_left:
            out.days_left = days
        if days < 0:
            out.worse("critical", f"{what}: expired {-days:.1f} days ago")
        elif days < warn_days:
            out.worse("warning", f"{what}: expires in {days:.1f} days (warn_days {warn_days:g})")
        deployed = (last.leaves.get(kind) or (last.fingerprint if i == 0 else None)) if last else None
        if deployed and deployed != fp:
            out.drift = True
            out.worse("critical", f"on disk {fp[:16]}… ({what}) is not what deploy {last.deploy_id if last else '?'} "
                                  f"put there ({deployed[:16]}…): changed by hand?")
    served_leaves = []
    for li in t.verify_endpoints():
        for _, kind, *_ in slots:
            la, served = _audit_listener(t, li, out, on_disk.get(kind), kind if dual else None)
            out.listeners.append(la)
            if served is not None:
                served_leaves.append(served.chain[0])
    if t.dane is not None:
        from .dane import served_mismatch

        for spki in sorted({material.spki_sha256(leaf.public_key()) for leaf in served_leaves}):
            for problem in served_mismatch(t, spki, journal):
                out.worse("critical", f"DANE: {problem}")
    return out


def _names(t: Target, li: Listener, leaf: x509.Certificate) -> list[str]:
    """The names a client checks the served chain for: the target's names (a wildcard
    through a label under it), else the listener's server_name, else none."""
    if t.names:
        return validation_names(t.names, leaf)
    if li.server_name:
        return [li.server_name]
    return []


def _audit_listener(t: Target, li: Listener, out: TargetAudit, on_disk: str | None,
                    kind: str | None) -> tuple[ListenerAudit, probe.Served | None]:
    proto = probe.resolve_protocol(li.protocol, li.port)
    endpoint = li.where + (f" ({kind.upper()})" if kind else "")
    la = ListenerAudit(endpoint=endpoint, protocol=proto)
    try:
        served = probe.probe_listener(li, kind if kind in ("rsa", "ecdsa") else None)
    except probe.ProbeError as err:
        la.error = str(err)
        out.worse("critical", f"{endpoint}: {err}")
        return la, None
    la.served_fingerprint = served.fingerprint
    la.served_not_after = served.not_after
    if on_disk and served.fingerprint != on_disk:
        out.drift = True
        out.worse("critical", f"{endpoint} serves {served.fingerprint[:16]}…, not the {on_disk[:16]}… on disk: the "
                              "daemon was not reloaded, or reads other files")
    leaf = served.chain[0]
    if t.allow_self_signed and leaf.issuer == leaf.subject and len(served.chain) == 1:
        return la, served  # DANE-EE: clients pin the key, no CA path to check
    try:
        anchors = material.anchors_for(t.trust_anchors)
    except MaterialError as err:
        out.worse("critical", str(err))
        return la, served
    for name in _names(t, li, leaf):
        why = material.chain_problem(leaf, served.chain[1:], name, anchors)
        la.chain[name] = why or "ok"
        if why:
            out.worse("critical", f"{endpoint}: the served chain does not verify for {name}: {why}")
    return la, served


def worst(audits: list[TargetAudit]) -> Status:
    return max((a.status for a in audits), key=lambda s: SEVERITY[s], default="ok")
