"""`mailtls deploy --check`: every check a deploy runs, what it would change, and
nothing changed -- no live byte, mode or mtime, no reload, no journal entry, no temp
file beside the target's files, no scratch directory left behind."""

from __future__ import annotations

import json
import os
import tempfile

from mailtls_tasks.core.journal import Journal
from tests.local.test_deploy import served
from tests.support.host import MailHost
from tests.support.pki import PKI, Issued, issue
from tests.support.tlsserver import TLSServer


def _check_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("mailtls-check-")}


def _untouched(host: MailHost, before: dict[str, tuple[bytes, int, int]], dirs: set[str]) -> None:
    assert host.snapshot() == before  # bytes, mode and mtime
    assert host.reload.calls == [] and host.stray_temps() == []
    assert all(not Journal(str(host.state)).records(t) for t in host.targets)
    assert _check_dirs() <= dirs


def _listening(host: MailHost, leaf: Issued, **fields: object) -> TLSServer:
    """Target mx with ``leaf`` installed and served, verified on its SMTP listener."""
    host.add_target("mx", **fields)
    host.install("mx", leaf)
    srv = host.server("mx", "smtp")
    host.enable_verify("mx", srv.endpoint, protocol="smtp")
    return srv


def test_check_reports_what_would_change_and_changes_nothing(host: MailHost, pki: PKI) -> None:
    old = pki.leaf("mail.example.test")
    new = pki.leaf("mail.example.test", sans=["mail.example.test", "smtp.example.test"])
    srv = _listening(host, old, names=["mail.example.test"])
    before, dirs = host.snapshot(), _check_dirs()

    p = host.cli("deploy", "mx", "--local", "--check", "--json", "--cert", "n.pem", "--key", "n.key",
                 input_files={"n.pem": new.fullchain_pem, "n.key": new.key_pem})

    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["outcome"] == "would_deploy" and report["target"] == "mx1/mx"
    slot = report["slots"][0]
    assert (slot["fingerprint"], slot["previous_fingerprint"]) == (new.fingerprint, old.fingerprint)
    assert slot["names_added"] == ["smtp.example.test"] and slot["names_removed"] == []
    assert slot["key_changes"] is True and slot["key"] == slot["previous_key"] == "ECDSA secp256r1"
    assert slot["chain"] == [pki.inter.cert.subject.rfc4514_string()] and slot["chain_changes"] is False
    assert report["files"] == {"cert": "changes", "key": "changes"}
    assert report["listeners"] == [{"endpoint": srv.endpoint, "server_name": None, "serves_now": old.fingerprint,
                                    "error": None, "would_serve": new.fingerprint}]
    assert len(host.validate.calls) == 1  # the daemon's config test, as validate runs it
    assert "a handshake with the files as the daemon loads them" in report["checks"]
    body = [ln for ln in new.key_pem.decode().splitlines() if "-----" not in ln]
    assert not any(line in p.stdout + p.stderr for line in body)
    _untouched(host, before, dirs)
    assert served(srv.endpoint, "smtp") == old.fingerprint

    human = host.cli("deploy", "mx", "--local", "--check", "--cert", "n.pem", "--key", "n.key")
    assert human.returncode == 0 and "mx1/mx: WOULD_DEPLOY" in human.stdout
    assert "added smtp.example.test" in human.stdout and "NEW KEY (SPKI changes)" in human.stdout
    _untouched(host, before, dirs)


def test_check_of_what_is_live_is_unchanged_and_bad_material_is_rejected(host: MailHost, pki: PKI) -> None:
    old = pki.leaf()
    _listening(host, old)
    before, dirs = host.snapshot(), _check_dirs()

    same = host.cli("deploy", "mx", "--local", "--check", "--json", "--cert", "o.pem", "--key", "o.key",
                    input_files={"o.pem": old.fullchain_pem, "o.key": old.key_pem})
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["outcome"] == "unchanged"

    wrong = host.cli("deploy", "mx", "--local", "--check", "--json", "--cert", "o.pem", "--key", "w.key",
                     input_files={"w.key": pki.leaf().key_pem})
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    report = json.loads(wrong.stdout)
    assert report["outcome"] == "rejected" and "does not match" in report["error"]

    other = issue("other-ca", ca=True)
    unrelated = host.cli("deploy", "mx", "--local", "--check", "--json", "--cert", "leaf.pem", "--key", "o.key",
                         "--chain", "x.pem", input_files={"x.pem": other.cert_pem, "leaf.pem": old.cert_pem})
    assert unrelated.returncode == 2 and "issuer" in json.loads(unrelated.stdout)["error"]
    _untouched(host, before, dirs)


def test_a_failing_config_test_rejects_the_check(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    host.install("mx", pki.leaf())
    host.validate.fail()
    before, dirs = host.snapshot(), _check_dirs()
    new = pki.leaf()
    p = host.cli("deploy", "mx", "--local", "--check", "--json", "--cert", "n.pem", "--key", "n.key",
                 input_files={"n.pem": new.fullchain_pem, "n.key": new.key_pem})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "validate_command failed" in json.loads(p.stdout)["error"]
    _untouched(host, before, dirs)
