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
import ssl
from typing import Literal

from pydantic import BaseModel, Field

from . import files, material, probe
from .config import Target, VerifySettings
from .journal import Journal, now_iso

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


def _verifying_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    ctx.check_hostname = True
    return ctx


def audit_target(t: Target, journal: Journal, host: str, *, warn_days: float,
                 now: dt.datetime | None = None) -> TargetAudit:
    """Probe and compare one target; never raises for what it finds (that is the result)."""
    now = now or dt.datetime.now(dt.UTC)
    out = TargetAudit(target=f"{host}/{t.name}", host=host)
    cert = files.read_bytes(files.real_path(t.cert_path))
    leaf = material.leaf_of_file(cert) if cert else None
    if leaf is None:
        out.worse("critical", f"no readable certificate at {t.cert_path}")
    else:
        out.on_disk_fingerprint = material.fingerprint(leaf)
        not_after = leaf.not_valid_after_utc
        out.not_after = not_after.isoformat()
        out.days_left = round((not_after - now).total_seconds() / 86400, 2)
        if out.days_left < 0:
            out.worse("critical", f"expired {-out.days_left:.1f} days ago")
        elif out.days_left < warn_days:
            out.worse("warning", f"expires in {out.days_left:.1f} days (warn_days {warn_days:g})")
    last = next((r for r in reversed(journal.records(t.name)) if r.outcome in ("deployed", "unchanged")), None)
    if last is not None:
        out.last_deployed_fingerprint, out.last_deploy_id = last.fingerprint, last.deploy_id
        if out.on_disk_fingerprint and last.fingerprint != out.on_disk_fingerprint:
            out.drift = True
            out.worse("critical", f"on disk {out.on_disk_fingerprint[:16]}… is not what deploy {last.deploy_id} "
                                  f"put there ({(last.fingerprint or '-')[:16]}…): changed by hand?")
    for v in t.verify_endpoints():
        out.listeners.append(_audit_listener(t, v, out))
    return out


def _names(t: Target, v: VerifySettings) -> list[str]:
    if t.names:
        return list(t.names)
    if v.server_name:
        return [v.server_name]
    return []


def _audit_listener(t: Target, v: VerifySettings, out: TargetAudit) -> ListenerAudit:
    proto = probe.resolve_protocol(v.protocol, v.port)
    la = ListenerAudit(endpoint=v.endpoint, protocol=proto)
    try:
        served = probe.probe(v.host, v.port, v.protocol, v.server_name, v.connect_timeout)
    except probe.ProbeError as err:
        la.error = str(err)
        out.worse("critical", f"{v.endpoint}: {err}")
        return la
    la.served_fingerprint = served.fingerprint
    la.served_not_after = served.not_after
    if out.on_disk_fingerprint and served.fingerprint != out.on_disk_fingerprint:
        out.drift = True
        out.worse("critical", f"{v.endpoint} serves {served.fingerprint[:16]}…, not the "
                              f"{out.on_disk_fingerprint[:16]}… on disk: the daemon was not reloaded, or reads "
                              "other files")
    ctx = _verifying_context(t.trust_anchors or None)
    for name in _names(t, v):
        try:
            probe.probe(v.host, v.port, v.protocol, name, v.connect_timeout, context=ctx)
            la.chain[name] = "ok"
        except probe.ProbeError as err:
            la.chain[name] = str(err)
            out.worse("critical", f"{v.endpoint}: the served chain does not verify for {name}: {err}")
    return la


def worst(audits: list[TargetAudit]) -> Status:
    return max((a.status for a in audits), key=lambda s: SEVERITY[s], default="ok")
