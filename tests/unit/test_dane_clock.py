"""The DANE first-seen clock (review findings: a cache's TTL countdown shortened the
wait; a withdrawn record kept its old date; nothing started the clock before a deploy)."""

from __future__ import annotations

from pathlib import Path

from mailtls_tasks.core.dane import TlsaAnswer, first_seen, forget_seen, note_answer
from mailtls_tasks.core.journal import Journal

SPKI = "ab" * 32


def test_the_clock_starts_at_the_first_validated_sighting_and_keeps_the_largest_ttl(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "state"))
    note_answer(j, TlsaAnswer("_25._tcp.mx.test", ((3, 1, 1, SPKI), (2, 0, 1, "cd" * 32)), 3600, True), now=1000.0)
    assert first_seen(j, "_25._tcp.mx.test", SPKI, now=5000.0, ttl=10) == (1000.0, 3600)  # a cache's countdown
    assert first_seen(j, "_25._tcp.mx.test", SPKI, now=6000.0, ttl=7200) == (1000.0, 7200)  # the zone raised it
    forget_seen(j, "_25._tcp.mx.test", SPKI)  # withdrawn: if it comes back, it counts from then
    assert first_seen(j, "_25._tcp.mx.test", SPKI, now=9000.0, ttl=60) == (9000.0, 60)


def test_an_unvalidated_answer_starts_no_clock(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "state"))
    note_answer(j, TlsaAnswer("_25._tcp.mx.test", ((3, 1, 1, SPKI),), 300, False), now=1000.0)
    assert first_seen(j, "_25._tcp.mx.test", SPKI, now=2000.0) == (2000.0, 0)
