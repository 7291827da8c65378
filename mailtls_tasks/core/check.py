"""Check mode: what a deploy would change, with nothing changed (``deploy --check``).

Every check stage and validate run -- the material (key, chain, validity, strength),
the target's names, the trust path, the DANE records, a handshake with the files as
the daemon would load them, and the daemon's own config test -- run on copies in a
private temporary directory outside the target's directories, removed on return.
No live file is touched, nothing is reloaded, no lock a deploy waits on is taken, the
journal is not written: there is nothing for recovery. The report says, per
certificate slot, what changes (names, issuer, validity, key, chain, the TLSA records
a new key would break) and, per listener, what it serves now against the new leaf.

Outcomes: ``would_deploy``, ``unchanged`` (the bytes are live, and served where verify
is on), ``rejected`` with the reason -- exit 0, 0, 2, as a deploy's.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, Field

from ..errors import MailTLSError, Rejected, ValidationFailed
from . import files, material, probe
from .config import HostConfig, Target
from .names import leaf_names

CheckOutcome = Literal["would_deploy", "unchanged", "rejected"]
CHECK_EXIT = {"would_deploy": 0, "unchanged": 0, "rejected": 2}

RawBundle = tuple[bytes, bytes, "bytes | None"]


class SlotChange(BaseModel):
    """One certificate slot (a dual target has two): the new leaf against the one on disk."""

    kind: str
    fingerprint: str
    previous_fingerprint: str | None = None
    subject: str
    previous_subject: str | None = None
    names: list[str] = Field(default_factory=list)
    names_added: list[str] = Field(default_factory=list)
    names_removed: list[str] = Field(default_factory=list)
    issuer: str
    previous_issuer: str | None = None
    not_before: str
    not_after: str
    previous_not_after: str | None = None
    key: str
    previous_key: str | None = None
    key_changes: bool = True  # the SPKI: what DANE 3 1 1 records and HPKP-style pins name
    tlsa: list[str] = Field(default_factory=list)  # what the new key does to each TLSA name of the target
    chain: list[str] = Field(default_factory=list)  # subjects, issuer first
    previous_chain: list[str] = Field(default_factory=list)
    chain_changes: bool = False


class ListenerView(BaseModel):
    endpoint: str
    server_name: str | None = None
    serves_now: str | None = None  # fingerprint, or None when it could not be reached (see error)
    error: str | None = None
    would_serve: str


class CheckReport(BaseModel):
    """What ``deploy --check`` prints (``--json``: this, as data). Never key material."""

    target: str
    host: str = ""
    outcome: CheckOutcome
    reason: str | None = None
    error: str | None = None
    slots: list[SlotChange] = Field(default_factory=list)
    listeners: list[ListenerView] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)  # role -> "changes" | "same bytes"
    notes: list[str] = Field(default_factory=list)
    checks: list[str] = Field(default_factory=list)  # what was run, in order

    @property
    def exit_code(self) -> int:
        return CHECK_EXIT[self.outcome]

    def human(self) -> str:
        head = f"{self.target}: {self.outcome.upper()}" + (f" ({self.reason})" if self.reason else "")
        lines = [head]
        if self.error:
            lines.append(f"  why           {self.error}")
        for s in self.slots:
            tag = f" [{s.kind}]" if s.kind != "any" else ""
            lines.append(f"  leaf{tag:<9} {s.fingerprint[:16]}… (now {(s.previous_fingerprint or '-')[:16]}…)")
            lines.append(f"  subject       {s.subject}" + (f" (now {s.previous_subject})"
                                                           if s.previous_subject not in (None, s.subject) else ""))
            lines.append(f"  names         {', '.join(s.names) or '-'}"
                         + (f"  added {', '.join(s.names_added)}" if s.names_added else "")
                         + (f"  REMOVED {', '.join(s.names_removed)}" if s.names_removed else ""))
            lines.append(f"  issuer        {s.issuer}" + (f" (now {s.previous_issuer})"
                                                          if s.previous_issuer not in (None, s.issuer) else ""))
            lines.append(f"  valid         {s.not_before} .. {s.not_after}"
                         + (f" (now until {s.previous_not_after})" if s.previous_not_after else ""))
            lines.append(f"  key           {s.key}" + (f" (now {s.previous_key})" if s.previous_key else "")
                         + ("  NEW KEY (SPKI changes)" if s.key_changes else "  same key (SPKI)"))
            for t in s.tlsa:
                lines.append(f"  tlsa          {t}")
            lines.append(f"  chain         {' <- '.join(s.chain) or '(none)'}"
                         + ("  (changes)" if s.chain_changes else "  (same)"))
        for role, what in self.files.items():
            lines.append(f"  file {role:<8} {what}")
        for li in self.listeners:
            now = li.serves_now[:16] + "…" if li.serves_now else f"unreachable ({li.error})"
            lines.append(f"  listener      {li.endpoint}{' SNI ' + li.server_name if li.server_name else ''}: "
                         f"serves {now}, would serve {li.would_serve[:16]}…")
        lines += [f"  note          {n}" for n in self.notes]
        if self.checks:
            lines.append(f"  checked       {', '.join(self.checks)}")
        return "\n".join(lines)


def check(cfg: HostConfig, target: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None, *,
          force: bool = False, also: list[RawBundle] | None = None, now: dt.datetime | None = None) -> CheckReport:
    """Run a deploy's checks for ``target`` without deploying; see the module doc. An
    unknown target or an unreadable config raises (as a deploy's would); bad material
    is a ``rejected`` report, not an exception."""
    from .steps.stage import judge_slots  # the very checks stage runs

    t = cfg.target(target)
    report = CheckReport(target=f"{cfg.host}/{t.name}", host=cfg.host, outcome="would_deploy")
    raw: list[RawBundle] = [(cert_pem, key_pem, chain_pem), *(also or [])]
    scratch = tempfile.mkdtemp(prefix="mailtls-check-")  # 0700, outside every target directory
    try:
        try:
            slots, wanted = judge_slots(t, raw, now)
            report.checks.append("material, names and trust path")
            current = {role: files.inspect(files.real_path(path)) for role, path in t.files()}
            for (prefix, kind, bundle), (_, _, _, _, chain_path, combined) in zip(slots, t.slots(), strict=True):
                data = current[prefix + ("combined" if combined else "cert")][1]
                old = material.leaf_of_file(data) if data else None
                material.check_not_older(bundle.leaf, old, force)
                chain_file = current[prefix + "chain"][1] if chain_path else data
                report.slots.append(_slot_change(kind, bundle, old, _certs(chain_file, skip_leaf=not chain_path)))
            report.checks.append("not older than the deployed leaf" + (" (--force)" if force else ""))
            if t.dane is not None:
                _dane(t, slots, report)
            _handshakes(t, slots, wanted, scratch)
            report.checks.append("a handshake with the files as the daemon loads them")
            if t.validate_command.strip():
                res = t.daemon.config_test(t.validate_command, timeout=t.command_timeout)
                if not res.ok:
                    raise ValidationFailed(f"validate_command failed: {res.summary()}")
                report.checks.append(f"validate_command ({t.validate_command})")
            from .steps.validate import reload_ready

            reload_ready(t)
        except MailTLSError as err:
            if isinstance(err, Rejected):
                report.outcome, report.error = "rejected", str(err)
                report.reason = getattr(err, "reason", None)
                return report
            raise
        same = {role: current[role][0].exists and current[role][0].sha256 == material.sha256(data)
                for role, data in wanted.items()}
        report.files = {role: "same bytes" if same[role] else ("changes" if current[role][0].exists else "new file")
                        for role in wanted}
        modes = _modes(t, current, report)
        _listeners(t, report)
        served_new = all(li.serves_now == li.would_serve for li in report.listeners)
        if all(same.values()) and not modes and served_new:
            report.outcome = "unchanged"
            report.reason = "bytes already live" + (" and served" if report.listeners else "; verify is off")
        elif all(same.values()):
            report.notes.append("the bytes are live but a listener serves another leaf: a deploy would reload and "
                                "verify")
        if t.sni is not None:
            report.notes.append("an SNI table is built and checked only by a deploy (postmap on the live table's "
                                "copy); check mode compares the files")
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _modes(t: Target, current: dict[str, Any], report: CheckReport) -> list[str]:
    """The files whose mode a deploy would change (stage's rule: a key file others can
    read is written 0600; key_mode / cert_mode when set)."""
    from .journal import DeployRecord
    from .steps.stage import new_mode

    scratch_rec = DeployRecord(deploy_id="check", target=t.name)
    changed = []
    for role, (st, _) in current.items():
        mode = new_mode(t, role, st, scratch_rec)
        if st.exists and st.mode != mode:
            changed.append(role)
            if report.files.get(role) == "same bytes":
                report.files[role] = f"same bytes, mode {st.mode:04o} -> {mode:04o}"
    report.notes += scratch_rec.notes
    return changed


def _describe_key(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size}"
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"ECDSA {pub.curve.name}"
    return type(pub).__name__.removeprefix("_")


def _subjects(chain: Any) -> list[str]:
    return [c.subject.rfc4514_string() for c in chain]


def _certs(data: bytes | None, *, skip_leaf: bool) -> list[x509.Certificate]:
    """The certificates of a live file (its chain: after the leaf, unless a chain file)."""
    if not data:
        return []
    try:
        certs = material.parse_certs(data, "live file")
    except MailTLSError:
        return []
    return certs[1:] if skip_leaf else certs


def _slot_change(kind: str, bundle: material.Bundle, old: x509.Certificate | None,
                 old_chain: list[x509.Certificate]) -> SlotChange:
    new_names, old_names = leaf_names(bundle.leaf), leaf_names(old) if old is not None else []
    out = SlotChange(kind=kind, fingerprint=bundle.fingerprint, subject=bundle.leaf.subject.rfc4514_string(),
                     names=new_names, issuer=bundle.leaf.issuer.rfc4514_string(),
                     not_before=bundle.leaf.not_valid_before_utc.isoformat(),
                     not_after=bundle.leaf.not_valid_after_utc.isoformat(), key=_describe_key(bundle.leaf),
                     chain=_subjects(bundle.chain))
    if old is not None:
        out.previous_fingerprint = material.fingerprint(old)
        out.previous_subject = old.subject.rfc4514_string()
        out.previous_issuer = old.issuer.rfc4514_string()
        out.previous_not_after = old.not_valid_after_utc.isoformat()
        out.previous_key = _describe_key(old)
        out.key_changes = material.spki_sha256(old.public_key()) != bundle.spki_sha256()
        out.names_added = sorted(set(new_names) - set(old_names))
        out.names_removed = sorted(set(old_names) - set(new_names))
        out.previous_chain = _subjects(old_chain)
        out.chain_changes = [material.fingerprint(c) for c in old_chain] != bundle.chain_fingerprints()
    return out


def _dane(t: Target, slots: list[tuple[str, str, material.Bundle]], report: CheckReport) -> None:
    """For each TLSA name: whether its validated records already pin each new key. A
    deploy of a new key they do not pin is refused at stage (it would break DANE)."""
    from . import dane

    assert t.dane is not None
    problems = []
    for name in t.dane.tlsa:
        answer = dane.query(name, t.dane)
        for _, _, b in slots:
            spki = b.spki_sha256()
            if not answer.validated:
                line = f"{name}: the answer is not DNSSEC-validated; a deploy is refused until it is"
                problems.append(line)
            elif answer.matches(spki):
                line = (f"{name}: pins the new key already (3 1 1 {spki[:16]}…); a deploy still waits until this "
                        "host has seen that record for min_age (2 x TTL by default)")
            else:
                line = (f"{name}: has no record for the new key -- it would break; publish beside the current one "
                        f"and wait 2 x TTL: {dane.record_for(name, spki)}")
                problems.append(line)
            report.slots[[s.kind for s in report.slots].index(_kind_of(slots, b))].tlsa.append(line)
    report.checks.append("DANE TLSA records")
    if problems:
        raise dane.TlsaNotReady("dane: " + "; ".join(problems))


def _kind_of(slots: list[tuple[str, str, material.Bundle]], b: material.Bundle) -> str:
    return next(kind for _, kind, x in slots if x is b)


def _handshakes(t: Target, slots: list[tuple[str, str, material.Bundle]], wanted: dict[str, bytes],
                scratch: str) -> None:
    """The files as the daemon would load them, written to the scratch directory only,
    loaded into OpenSSL and shaken hands with (validate's check, on copies)."""
    from .steps.validate import daemon_check, handshake_with

    pairs = []
    for prefix, kind, bundle in slots:
        combined = wanted.get(prefix + "combined")
        if combined is not None:
            certfile = keyfile = os.path.join(scratch, f"{kind}-combined.pem")
            files.write_scratch(certfile, combined)
        else:
            certfile, keyfile = os.path.join(scratch, f"{kind}-cert.pem"), os.path.join(scratch, f"{kind}-key.pem")
            files.write_scratch(certfile, wanted[prefix + "cert"] + wanted.get(prefix + "chain", b""))
            files.write_scratch(keyfile, wanted[prefix + "key"])
        what = f"the {kind if kind != 'any' else ''} cert/key".replace("  ", " ")
        if handshake_with(certfile, keyfile, what) != bundle.fingerprint:
            raise ValidationFailed("a local handshake with the new files served another certificate")
        pairs.append((certfile, keyfile))
    daemon_check(t, pairs)


def _listeners(t: Target, report: CheckReport) -> None:
    """What every listener serves now, against the leaf it would serve."""
    wants = {s.kind: s.fingerprint for s in report.slots}
    from .steps.served import expected_algorithm

    for li in t.verify_endpoints():
        for kind, fp in wants.items():
            algorithm = expected_algorithm(kind) if len(wants) > 1 else None
            view = ListenerView(endpoint=li.endpoint + (f" [{kind}]" if algorithm else ""),
                                server_name=li.server_name, would_serve=fp)
            try:
                view.serves_now = probe.probe_listener(li, algorithm).fingerprint
            except probe.ProbeError as err:
                view.error = str(err)
            report.listeners.append(view)
    if report.listeners:
        report.checks.append(f"{len(report.listeners)} listener(s) probed")
