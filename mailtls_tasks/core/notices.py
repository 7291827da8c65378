"""What a host notifies about, built from its own records and audits (``notify``
delivers them). A notice names the target, host, deploy id, outcome and reason, and
the command to follow it up; never key material (records hold none)."""

from __future__ import annotations

from typing import Any

from ..notify import Notice
from .journal import DeployRecord

LOCAL_ATTEMPTS = 3  # in-process: a few tries (1 s, 2 s apart), then say it failed

NOTIFIED_OUTCOMES = ("rejected", "rolled_back", "failed")


def for_record(rec: DeployRecord, *, distributed: bool) -> Notice | None:
    """The notice of a deploy that did not go out, or None. A deploy its client
    cancelled (the client said so itself) is not one."""
    if rec.outcome not in NOTIFIED_OUTCOMES or rec.reason == "cancelled":
        return None
    address = f"{rec.host}/{rec.target}" if rec.host else rec.target
    follow = (f"mailtls status {rec.deploy_id}" if distributed
              else f"mailtls history {address} --local (on {rec.host or 'the host'})")
    what = {"rejected": "was rejected: nothing was touched",
            "rolled_back": "was rolled back: the old certificate is back and served",
            "failed": "FAILED: the files on disk may not be what the daemon serves; an operator is needed"}
    lines = [f"The deploy of a new certificate to {address} {what[str(rec.outcome)]}.", "",
             f"target:    {address}", f"host:      {rec.host}", f"deploy:    {rec.deploy_id}",
             f"outcome:   {rec.outcome}" + (f" ({rec.reason})" if rec.reason else "")]
    if rec.error:
        lines.append(f"why:       {rec.error}")
    if rec.fingerprint:
        lines.append(f"new leaf:  {rec.fingerprint}")
    lines += ["", f"Follow it: {follow}"]
    return Notice(kind=str(rec.outcome), title=f"mailtls: {address} {rec.outcome}"
                  + (f" ({rec.reason})" if rec.reason else ""), body="\n".join(lines),
                  fields={"target": address, "host": rec.host, "deploy_id": rec.deploy_id, "outcome": rec.outcome,
                          "reason": rec.reason, "error": rec.error, "follow": follow})


def for_expiry(audit: Any, days: float) -> Notice | None:
    """A target whose served (or on-disk) certificate ends within ``days``."""
    left = audit.days_left
    if left is None or left > days:
        return None
    lines = [f"The certificate of {audit.target} expires in {left:.1f} days.", "",
             f"target:    {audit.target}", f"on disk:   {audit.on_disk_fingerprint or '-'}",
             f"not after: {audit.not_after or '-'}"]
    lines += [f"issue:     {i}" for i in audit.issues]
    lines += ["", "Follow it: mailtls audit --now"]
    host = audit.target.split("/", 1)[0]
    return Notice(kind="expiring", title=f"mailtls: {audit.target} expires in {left:.0f} days", body="\n".join(lines),
                  fields={"target": audit.target, "host": host, "days_left": round(left, 1),
                          "not_after": audit.not_after, "follow": "mailtls audit --now"})


def for_rollout(result: Any) -> Notice:
    """A halted rollout (sent by its client, from the pipeline file's URLs)."""
    bad = {a: t for a, t in result.targets.items() if t.outcome not in ("deployed", "unchanged", "pending")}
    lines = [f"Rollout {result.rollout_id} halted: later waves were not sent.", ""]
    lines += [f"{a}: {t.outcome}" + (f" ({t.reason})" if t.reason else "") + (f" -- {t.error}" if t.error else "")
              + (f" [deploy {t.deploy_id}]" if t.deploy_id else "") for a, t in sorted(bad.items())]
    lines += ["", f"Follow it: mailtls rollout-status {result.rollout_id}"]
    return Notice(kind="halted", title=f"mailtls: rollout {result.rollout_id} halted ({result.worst})",
                  body="\n".join(lines), fields={"rollout_id": result.rollout_id, "worst": result.worst,
                                                 "follow": f"mailtls rollout-status {result.rollout_id}"})


def notify_local(cfg: Any, rec: DeployRecord) -> list[str]:
    """A --local or certbot-hook deploy's notice, sent in-process from the host's own
    config, a few tries, after the deploy has ended (it cannot change the outcome).
    Returns what to add to the result's notes: where it went, or that it failed."""
    notice = for_record(rec, distributed=False)
    urls = cfg.notify.urls_for(notice.kind) if notice is not None else []
    if notice is None or not urls:
        return []
    from ..notify import deliver_bounded

    attempts = max(1, min(cfg.notify.retries + 1, LOCAL_ATTEMPTS))
    got = deliver_bounded(urls, notice, attempts=attempts)
    notes = [f"notified {', '.join(got.sent)}"] if got.sent else []
    if got.failed:
        notes.append(f"notification failed after {attempts} tries: {', '.join(got.shown_failed)}")
    return notes
