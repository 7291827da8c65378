"""The DANE guard: a key change waits until DNS says it is safe.

A mail server with DANE publishes TLSA records; a sending MTA that validates them
(many large providers do) refuses to deliver to a server whose key matches none.
Changing the key is therefore a two-step dance: publish a ``3 1 1`` record for the
new key beside the old one, wait until every resolver has dropped the old RRset from
its cache (twice the TTL), then deploy. This module makes the deploy wait for that:
when a deploy changes a target's key, every TLSA name of the target must return,
DNSSEC-validated (the AD bit from a validating resolver), a ``3 1 1`` record matching
the new key's SubjectPublicKeyInfo, first seen at least ``min_age`` ago (default
2 x TTL); otherwise the deploy is ``rejected`` with reason ``tlsa_not_ready`` and the
exact record to publish. A deploy that keeps the key passes untouched.

When a record was first seen is the host's own memory (``state_dir/dane``): DNS has
no such field, and the time a record appeared is exactly what the caches care about.
The clock starts at the first validated sighting, by a deploy attempt or by the
periodic audit (which notes every ``3 1 1`` record it sees), so "publish, wait,
deploy" works without a failed attempt first; a record that disappears from a
validated answer is forgotten, and counts from zero if it comes back. The TTL is
the zone's (the RRSIG's original TTL), never the countdown a cache reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from ..errors import Rejected
from . import files
from .config import DaneSettings, Target, split_endpoint
from .journal import Journal


class TlsaNotReady(Rejected):
    """The TLSA records do not (yet) allow this key change; nothing was touched."""

    reason = "tlsa_not_ready"


@dataclass(frozen=True)
class TlsaAnswer:
    name: str
    records: tuple[tuple[int, int, int, str], ...]  # usage, selector, matching type, data (hex)
    ttl: int
    validated: bool  # the resolver set AD: the answer is DNSSEC-validated

    def matches(self, spki_sha256: str) -> bool:
        return (3, 1, 1, spki_sha256.lower()) in self.records


def record_for(name: str, spki_sha256: str) -> str:
    """The line to add to the zone for a key (DANE-EE, SPKI, SHA-256)."""
    return f"{name}. IN TLSA 3 1 1 {spki_sha256}"


def query(name: str, settings: DaneSettings) -> TlsaAnswer:
    """Ask the validating resolver for ``name``'s TLSA RRset, with DNSSEC (DO) and AD."""
    host, port = split_endpoint(settings.resolver)
    q = dns.message.make_query(name, dns.rdatatype.TLSA, want_dnssec=True)
    q.flags |= dns.flags.AD
    try:
        resp = dns.query.udp(q, host, port=port, timeout=settings.timeout)
        if resp.flags & dns.flags.TC:
            resp = dns.query.tcp(q, host, port=port, timeout=settings.timeout)
    except (dns.exception.DNSException, OSError) as err:
        raise TlsaNotReady(f"dane: cannot ask {settings.resolver} for {name} TLSA: {err}") from None
    if resp.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise TlsaNotReady(f"dane: {settings.resolver} answered {dns.rcode.to_text(resp.rcode())} for {name} TLSA")
    records: list[tuple[int, int, int, str]] = []
    ttl = 0
    for rrset in resp.answer:
        if rrset.rdtype == dns.rdatatype.TLSA:
            ttl = max(ttl, rrset.ttl)
            records += [(r.usage, r.selector, r.mtype, r.cert.hex()) for r in rrset]
        elif rrset.rdtype == dns.rdatatype.RRSIG:
            # a cache hands out what is left of the TTL; the signature carries the zone's own
            ttl = max([ttl, *(r.original_ttl for r in rrset if r.type_covered == dns.rdatatype.TLSA)])
    return TlsaAnswer(name, tuple(records), ttl, bool(resp.flags & dns.flags.AD))


def _seen_path(journal: Journal, name: str, spki: str) -> str:
    key = hashlib.sha256(f"{name}|{spki}".encode()).hexdigest()[:32]
    return os.path.join(journal.root, "dane", key + ".json")


def first_seen(journal: Journal, name: str, spki: str, now: float, ttl: int = 0) -> tuple[float, int]:
    """When this host first saw a validated record for ``spki`` at ``name`` (now, if
    never), and the largest TTL seen for it since."""
    path = _seen_path(journal, name, spki)
    data = files.read_bytes(path)
    seen, most = now, ttl
    if data:
        try:
            d = json.loads(data)
            seen, most = float(d["first_seen"]), max(ttl, int(d.get("ttl", 0)))
            if most == int(d.get("ttl", 0)):
                return seen, most
        except (ValueError, KeyError, TypeError):
            seen, most = now, ttl
    files.private_dirs(journal.root, os.path.dirname(path))
    files.atomic_write(path, json.dumps({"name": name, "spki": spki, "first_seen": seen, "ttl": most}).encode(),
                       0o600)
    return seen, most


def forget_seen(journal: Journal, name: str, spki: str) -> None:
    """A validated answer without the record: if it comes back, its clock restarts."""
    try:
        os.unlink(_seen_path(journal, name, spki))
    except FileNotFoundError:
        pass


def note_answer(journal: Journal, answer: TlsaAnswer, now: float) -> None:
    """Start the clock of every validated ``3 1 1`` record in ``answer`` (the audit calls
    this, so a record published ahead of a deploy is already counting)."""
    if not answer.validated:
        return
    for usage, selector, mtype, data in answer.records:
        if (usage, selector, mtype) == (3, 1, 1):
            first_seen(journal, answer.name, data, now, answer.ttl)


def require_ready(t: Target, journal: Journal, spkis: list[str], now: float | None = None) -> None:
    """Raise TlsaNotReady unless every TLSA name of ``t`` is ready for each new key.
    Every name and key is checked (and its clock started) before it raises, naming all
    that are not ready, so the waits run side by side rather than one after another."""
    assert t.dane is not None
    now = time.time() if now is None else now
    problems: list[str] = []
    for name in t.dane.tlsa:
        answer = query(name, t.dane)
        note_answer(journal, answer, now)
        for spki in spkis:
            wanted = record_for(name, spki)
            if not answer.validated:
                problems.append(f"the TLSA answer for {name} is not DNSSEC-validated (no AD bit from "
                                f"{t.dane.resolver}: unsigned zone, or not a validating resolver); the new key "
                                f"needs, validated: {wanted}")
                continue
            if not answer.matches(spki):
                forget_seen(journal, name, spki)
                problems.append(f"{name} has no TLSA 3 1 1 record for the new key; publish it beside the current "
                                f"one, wait 2 x TTL, deploy again: {wanted}")
                continue
            seen, ttl = first_seen(journal, name, spki, now, answer.ttl)
            min_age = t.dane.min_age if t.dane.min_age is not None else 2 * ttl
            age = now - seen
            if age < min_age:
                problems.append(f"the TLSA record for the new key at {name} was first seen {age:.0f}s ago; "
                                f"resolvers may cache the old RRset for {min_age:.0f}s (2 x TTL {ttl}s): "
                                f"deploy again in {min_age - age:.0f}s ({wanted})")
    if problems:
        raise TlsaNotReady("dane: " + "; ".join(problems))


def served_mismatch(t: Target, served_spki: str, journal: Journal | None = None) -> list[str]:
    """For the audit: the TLSA names whose validated records no longer match the served
    key (and, with ``journal``, start the clock of every record seen)."""
    assert t.dane is not None
    bad = []
    for name in t.dane.tlsa:
        try:
            answer = query(name, t.dane)
        except TlsaNotReady as err:
            bad.append(f"{name}: {err}")
            continue
        if journal is not None:
            note_answer(journal, answer, time.time())
        if not answer.validated:
            bad.append(f"{name}: the answer is not DNSSEC-validated")
        elif not answer.matches(served_spki):
            bad.append(f"{name}: no TLSA 3 1 1 record matches the served key ({record_for(name, served_spki)})")
    return bad
