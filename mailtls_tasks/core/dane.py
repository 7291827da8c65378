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
            ttl = rrset.ttl
            records += [(r.usage, r.selector, r.mtype, r.cert.hex()) for r in rrset]
    return TlsaAnswer(name, tuple(records), ttl, bool(resp.flags & dns.flags.AD))


def _seen_path(journal: Journal, name: str, spki: str) -> str:
    key = hashlib.sha256(f"{name}|{spki}".encode()).hexdigest()[:32]
    return os.path.join(journal.root, "dane", key + ".json")


def first_seen(journal: Journal, name: str, spki: str, now: float) -> float:
    """When this host first saw a validated record for ``spki`` at ``name`` (now, if never)."""
    path = _seen_path(journal, name, spki)
    data = files.read_bytes(path)
    if data:
        try:
            return float(json.loads(data)["first_seen"])
        except (ValueError, KeyError, TypeError):
            pass
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    files.atomic_write(path, json.dumps({"name": name, "spki": spki, "first_seen": now}).encode(), 0o600)
    return now


def require_ready(t: Target, journal: Journal, spkis: list[str], now: float | None = None) -> None:
    """Raise TlsaNotReady unless every TLSA name of ``t`` is ready for each new key."""
    assert t.dane is not None
    now = time.time() if now is None else now
    for name in t.dane.tlsa:
        answer = query(name, t.dane)
        for spki in spkis:
            wanted = record_for(name, spki)
            if not answer.validated:
                raise TlsaNotReady(f"dane: the TLSA answer for {name} is not DNSSEC-validated (no AD bit from "
                                   f"{t.dane.resolver}: unsigned zone, or not a validating resolver); the new key "
                                   f"needs, validated: {wanted}")
            if not answer.matches(spki):
                raise TlsaNotReady(f"dane: {name} has no TLSA 3 1 1 record for the new key; publish it beside the "
                                   f"current one, wait 2 x TTL, deploy again: {wanted}")
            min_age = t.dane.min_age if t.dane.min_age is not None else 2 * answer.ttl
            age = now - first_seen(journal, name, spki, now)
            if age < min_age:
                raise TlsaNotReady(f"dane: the TLSA record for the new key at {name} was first seen {age:.0f}s ago; "
                                   f"resolvers may cache the old RRset for {min_age:.0f}s (2 x TTL {answer.ttl}s): "
                                   f"deploy again in {min_age - age:.0f}s ({wanted})")


def served_mismatch(t: Target, served_spki: str) -> list[str]:
    """For the audit: the TLSA names whose validated records no longer match the served key."""
    assert t.dane is not None
    bad = []
    for name in t.dane.tlsa:
        try:
            answer = query(name, t.dane)
        except TlsaNotReady as err:
            bad.append(f"{name}: {err}")
            continue
        if not answer.validated:
            bad.append(f"{name}: the answer is not DNSSEC-validated")
        elif not answer.matches(served_spki):
            bad.append(f"{name}: no TLSA 3 1 1 record matches the served key ({record_for(name, served_spki)})")
    return bad
