"""Targets that share some files but not a whole certificate.

Two daemons reading one key file, each with a certificate of its own (certbot's
--reuse-key makes such hosts), or one certificate file that one target pairs with a
chain file and the other reads whole: a deploy to one must not leave the other with
files its daemon cannot serve. It is refused (``rejected``, nothing touched) when it
would; it goes ahead when the other target's files stay whole.
"""

from __future__ import annotations

from pathlib import Path

from mailtls_tasks.core import material
from tests.support.host import MailHost
from tests.support.pki import PKI, issue


def _share_key(host: MailHost) -> Path:
    key = host.certs / "shared-key.pem"
    host.add_target("smtp", key_path=str(key))
    host.add_target("imap", key_path=str(key))
    return key


def _assert_whole(host: MailHost, target: str) -> None:
    cert, key = host.path(target, "cert").read_bytes(), host.path(target, "key").read_bytes()
    assert material.key_matches_cert(key, cert)


def test_a_new_key_for_one_of_two_targets_sharing_the_key_is_refused(host: MailHost, pki: PKI) -> None:
    _share_key(host)
    first = pki.leaf()
    host.install("smtp", first)
    host.install("imap", issue("imap.example.test", pki.inter, key=first.key))
    before = host.snapshot()

    r = host.deploy("smtp", pki.leaf())  # a new key

    assert r.outcome == "rejected"
    assert "'imap'" in (r.error or "") and "shared-key.pem" in (r.error or "")
    assert "a key that does not match its certificate" in (r.error or "")
    assert host.snapshot() == before and host.stray_temps() == []
    assert host.reload.calls == []
    _assert_whole(host, "imap")


def test_the_same_key_again_goes_ahead_and_both_stay_whole(host: MailHost, pki: PKI) -> None:
    _share_key(host)
    first = pki.leaf()
    host.install("smtp", first)
    host.install("imap", issue("imap.example.test", pki.inter, key=first.key))
    renewed = issue("mail.example.test", pki.inter, key=first.key)
    renewed.chain = [pki.inter.cert]

    r = host.deploy("smtp", renewed)

    assert r.outcome == "deployed", r.error
    assert host.path("smtp", "cert").read_bytes() == renewed.fullchain_pem
    _assert_whole(host, "smtp")
    _assert_whole(host, "imap")


def test_a_shared_cert_file_is_not_stripped_of_the_chain_the_other_target_reads_in_it(host: MailHost,
                                                                                      pki: PKI) -> None:
    cert = host.certs / "shared-cert.pem"
    host.add_target("smtp", cert_path=str(cert), key_path=str(host.certs / "k.pem"),
                    chain_path=str(host.certs / "chain.pem"))
    host.add_target("imap", cert_path=str(cert), key_path=str(host.certs / "k.pem"))  # chain in the cert file
    old = pki.leaf()
    host.install("imap", old)  # the full chain in the cert file
    (host.certs / "chain.pem").write_bytes(old.chain_pem)
    before = host.snapshot()

    r = host.deploy("smtp", pki.leaf())

    assert r.outcome == "rejected"
    assert "'imap'" in (r.error or "") and "no chain" in (r.error or "")
    assert host.snapshot() == before and host.stray_temps() == []


def test_two_targets_sharing_the_whole_pair_are_not_refused(host: MailHost, pki: PKI) -> None:
    cert, key = host.certs / "c.pem", host.certs / "k.pem"
    host.add_target("smtp", cert_path=str(cert), key_path=str(key))
    host.add_target("imap", cert_path=str(cert), key_path=str(key))
    host.install("smtp", pki.leaf())

    r = host.deploy("imap", pki.leaf())

    assert r.outcome == "deployed", r.error
    _assert_whole(host, "smtp")


def _share_pair(host: MailHost, **imap: object) -> None:
    cert, key = host.certs / "c.pem", host.certs / "k.pem"
    host.add_target("smtp", cert_path=str(cert), key_path=str(key))
    host.add_target("imap", cert_path=str(cert), key_path=str(key), **imap)


def test_a_whole_shared_pair_takes_a_leaf_that_needs_no_chain(host: MailHost, pki: PKI) -> None:
    anchors = host.root / "anchors.pem"
    anchors.write_bytes(pki.root.cert_pem)
    _share_pair(host, trust_anchors=str(anchors))
    host.targets["smtp"]["trust_anchors"] = str(anchors)
    host.write_config()
    host.install("smtp", pki.leaf())  # with its chain
    direct = issue("mail.example.test", pki.root)  # issued by the root itself: nothing to chain

    r = host.deploy("smtp", direct)

    assert r.outcome == "deployed", r.error
    assert host.path("imap", "cert").read_bytes() == direct.cert_pem


def test_the_other_target_must_accept_the_leaf_it_will_serve(host: MailHost, pki: PKI) -> None:
    _share_pair(host, names=["imap.example.test"])
    host.install("smtp", pki.leaf(sans=["mail.example.test", "imap.example.test"]))
    before = host.snapshot()

    r = host.deploy("smtp", pki.leaf(sans=["mail.example.test"]))

    assert r.outcome == "rejected"
    assert "'imap'" in (r.error or "") and "does not cover imap.example.test" in (r.error or "")
    assert host.snapshot() == before and host.stray_temps() == []


def test_a_batch_of_two_targets_reading_the_same_pair_runs_them_in_two_rounds(host: MailHost, pki: PKI) -> None:
    """Postfix and Dovecot on one certificate, both renewed in one batch (a rollout of
    several certificates, the certbot spool): one run cannot own a file for two
    members, so the second goes in a round of its own and finds the bytes in place.
    (It used to end the first rejected and crash the run.)"""
    from mailtls_tasks.core.batch import Member, run_batch

    cert, key = host.certs / "pair-cert.pem", host.certs / "pair-key.pem"
    host.add_target("smtp", cert_path=str(cert), key_path=str(key))
    host.add_target("imap", cert_path=str(cert), key_path=str(key))
    host.add_target("web")
    host.install("smtp", pki.leaf())
    host.install("web", pki.leaf())
    new, web = pki.leaf(), pki.leaf()

    results = run_batch(host.config, [Member("smtp", new.fullchain_pem, new.key_pem),
                                      Member("imap", new.fullchain_pem, new.key_pem),
                                      Member("web", web.fullchain_pem, web.key_pem)], lock_timeout=5)

    # the second round found its bytes live: without verify on, that is "unchanged", as
    # for a second deploy (with verify on it reloads and verifies: tests/e2e)
    assert [(r.target, r.outcome) for r in results] == [("mx1/smtp", "deployed"), ("mx1/imap", "unchanged"),
                                                        ("mx1/web", "deployed")], [r.error for r in results]
    assert (cert.read_bytes(), key.read_bytes()) == (new.fullchain_pem, new.key_pem)
    assert host.path("web", "key").read_bytes() == web.key_pem
    assert len(host.reload.calls) == 1  # the first round's, for smtp and web (one reload command)
    assert host.stray_temps() == []
