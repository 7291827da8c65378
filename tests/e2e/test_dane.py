"""The DANE guard against a real validating resolver: unbound, with a zone signed by
ldns-signzone and served by nsd (and an unsigned one), queried with dnspython."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.core.host import HostRuntime
from mailtls_tasks.core.material import spki_sha256
from tests.support.dns import SIGNED, UNSIGNED, DnsWorld
from tests.support.host import MailHost
from tests.support.pki import PKI, Issued
from tests.support.services import REPO

pytestmark = pytest.mark.e2e
MIN_AGE = 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsWorld]:
    w = DnsWorld(tmp_path_factory.mktemp("dns"))
    yield w
    w.stop()


def _host(tmp_path: Path, world: DnsWorld, pki: PKI, zone: str) -> tuple[MailHost, Issued, str]:
    host = MailHost(tmp_path)
    name = f"_25._tcp.mx.{zone}"
    host.add_target("mx", dane={"tlsa": [name], "resolver": world.resolver, "min_age": f"{MIN_AGE}s"})
    first = pki.leaf()
    host.install("mx", first)
    world.set_tlsa(zone, "_25._tcp.mx", spki_sha256(first.cert.public_key()))  # the key in service
    return host, first, name


def _spki(leaf: Issued) -> str:
    return spki_sha256(leaf.cert.public_key())


def test_a_key_change_waits_for_its_tlsa_record(tmp_path: Path, world: DnsWorld, pki: PKI) -> None:
    host, first, name = _host(tmp_path, world, pki, SIGNED)
    new = pki.leaf()

    # 1. no record for the new key: refused, with the exact record to publish
    r = host.deploy("mx", new)
    assert (r.outcome, r.reason) == ("rejected", "tlsa_not_ready"), r
    assert f"{name}. IN TLSA 3 1 1 {_spki(new)}" in (r.error or "")
    assert host.path("mx", "key").read_bytes() == first.key_pem

    # 2. published (beside the current one), but just now: resolvers may still cache the old RRset
    world.set_tlsa(SIGNED, "_25._tcp.mx", _spki(first), _spki(new))
    r = host.deploy("mx", new)
    assert (r.outcome, r.reason) == ("rejected", "tlsa_not_ready") and "first seen" in (r.error or ""), r

    # 3. old enough: the key change goes through
    time.sleep(MIN_AGE + 0.5)
    r = host.deploy("mx", new)
    assert r.outcome == "deployed", r.error
    assert host.path("mx", "key").read_bytes() == new.key_pem


def test_a_deploy_that_keeps_the_key_needs_no_new_record(tmp_path: Path, world: DnsWorld, pki: PKI) -> None:
    host, first, _ = _host(tmp_path, world, pki, SIGNED)
    same_key = pki.leaf(key=first.key)
    r = host.deploy("mx", same_key)
    assert r.outcome == "deployed", r.error


def test_an_answer_without_the_ad_bit_is_not_enough(tmp_path: Path, world: DnsWorld, pki: PKI) -> None:
    host, first, _ = _host(tmp_path, world, pki, UNSIGNED)
    new = pki.leaf()
    world.set_tlsa(UNSIGNED, "_25._tcp.mx", _spki(first), _spki(new))
    time.sleep(MIN_AGE + 0.5)
    r = host.deploy("mx", new)
    assert (r.outcome, r.reason) == ("rejected", "tlsa_not_ready"), r
    assert "not DNSSEC-validated" in (r.error or "")


def test_dane_next_prints_the_records_to_publish(tmp_path: Path, world: DnsWorld, pki: PKI) -> None:
    host, _, name = _host(tmp_path, world, pki, SIGNED)
    nxt = pki.leaf()
    (tmp_path / "next.key").write_bytes(nxt.key_pem)
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "dane", "next", "mx", "--key",
                        str(tmp_path / "next.key"), "--config", str(host.config_path)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"{name}. IN TLSA 3 1 1 {_spki(nxt)}", p.stdout + p.stderr


def test_the_audit_flags_tlsa_that_no_longer_match_the_served_key(tmp_path: Path, world: DnsWorld,
                                                                  pki: PKI) -> None:
    host, _, name = _host(tmp_path, world, pki, SIGNED)
    srv = host.server("mx", "smtp")
    host.enable_verify("mx", srv.endpoint, protocol="smtp")
    rt = HostRuntime(host.config)
    (ok,) = rt.audit()
    assert not any("DANE" in i for i in ok.issues), ok.issues
    world.set_tlsa(SIGNED, "_25._tcp.mx", _spki(pki.leaf()))  # someone published only another key's record
    (bad,) = rt.audit()
    assert bad.status == "critical"
    assert any(f"DANE: {name}: no TLSA 3 1 1 record matches the served key" in i for i in bad.issues), bad.issues
    data = json.loads(bad.model_dump_json())
    assert data["target"] == "mx1/mx"


def test_check_mode_names_the_tlsa_record_a_new_key_would_break(tmp_path: Path, world: DnsWorld, pki: PKI) -> None:
    """`deploy --check` asks the validating resolver as stage would, and says which TLSA
    name would break and the record to publish; nothing written, the clock not started."""
    from mailtls_tasks.core.check import check

    host, first, name = _host(tmp_path, world, pki, SIGNED)
    new = pki.leaf()
    rep = check(host.config, "mx", new.fullchain_pem, new.key_pem)
    assert (rep.outcome, rep.reason) == ("rejected", "tlsa_not_ready"), rep
    assert rep.slots[0].key_changes is True
    assert any("would break" in t and f"{name}. IN TLSA 3 1 1 {_spki(new)}" in t for t in rep.slots[0].tlsa), rep
    world.set_tlsa(SIGNED, "_25._tcp.mx", _spki(first), _spki(new))
    rep = check(host.config, "mx", new.fullchain_pem, new.key_pem)
    assert rep.outcome == "would_deploy" and "pins the new key already" in rep.slots[0].tlsa[0], rep
    same = check(host.config, "mx", first.fullchain_pem, first.key_pem)
    assert same.outcome == "unchanged" and same.slots[0].key_changes is False, same
    assert host.path("mx", "key").read_bytes() == first.key_pem
    assert not list((host.state).rglob("record.json"))
