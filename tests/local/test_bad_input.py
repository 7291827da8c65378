"""The bad-input corpus: every case is refused with exit 2, a message naming what is
wrong, and nothing on disk changed (bytes and mtime), through the real CLI."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailtls_tasks.cli.root import cli
from mailtls_tasks.core.local import run_local
from mailtls_tasks.ids import MAX_INPUT_BYTES
from tests.support.host import MailHost
from tests.support.pki import PKI, issue, new_key

UTC = dt.UTC
Case = Callable[[PKI], tuple[bytes, bytes, bytes | None]]


def _leaf(pki: PKI, **kw: object) -> tuple[bytes, bytes, bytes | None]:
    leaf = pki.leaf(**kw)  # type: ignore[arg-type]
    return leaf.cert_pem, leaf.key_pem, leaf.chain_pem


def _mut(fn: Callable[[bytes, bytes, bytes | None], tuple[bytes, bytes, bytes | None]]) -> Case:
    return lambda pki: fn(*_leaf(pki))


NOW = dt.datetime.now(UTC)
CASES: dict[str, tuple[Case, str]] = {
    "malformed PEM body": (_mut(lambda c, k, ch: (c.replace(b"\n", b"\n!", 3), k, ch)), "cert: "),
    "truncated PEM": (_mut(lambda c, k, ch: (c[: len(c) // 2], k, ch)), "cert: "),
    "DER certificate": (lambda pki: (pki.leaf().cert.public_bytes(serialization.Encoding.DER), pki.leaf().key_pem,
                                     None), "looks like DER"),
    "trailing garbage": (_mut(lambda c, k, ch: (c + b"garbage\n", k, ch)), "outside PEM blocks"),
    "several keys": (lambda pki: (lambda a, b: (a.cert_pem, a.key_pem + b.key_pem, a.chain_pem))(pki.leaf(),
                                                                                                 pki.leaf()),
                     "exactly one private key"),
    "encrypted key": (lambda pki: (lambda a: (a.cert_pem, a.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")), a.chain_pem))(pki.leaf()), "encrypted"),
    "key for another cert": (lambda pki: (pki.leaf().cert_pem, pki.leaf().key_pem, pki.inter.cert_pem),
                             "does not match"),
    "CA certificate as leaf": (lambda pki: (pki.inter.cert_pem, pki.inter.key_pem, pki.root.cert_pem),
                               "CA certificate"),
    "leaf without serverAuth": (lambda pki: _leaf(pki, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]), "serverAuth"),
    "RSA 1024": (lambda pki: _leaf(pki, key=new_key("rsa", 1024)), "too weak"),
    "expired leaf": (lambda pki: _leaf(pki, not_before=NOW - dt.timedelta(days=90),
                                       not_after=NOW - dt.timedelta(days=1)), "expired"),
    "not yet valid leaf": (lambda pki: _leaf(pki, not_before=NOW + dt.timedelta(days=2)), "not valid before"),
    "chain out of order": (lambda pki: (pki.leaf().cert_pem, b"", None) if False else
                           (lambda a: (a.cert_pem, a.key_pem, pki.root.cert_pem + pki.inter.cert_pem))(pki.leaf()),
                           "is issued by chain certificate 2, not by certificate 1 that follows it: chain out of "
                           "order"),
    "unrelated chain": (lambda pki: (lambda a: (a.cert_pem, a.key_pem, issue("other", ca=True).cert_pem))(
        pki.leaf()), "the leaf's issuer CN=mailtls test intermediate is missing; the chain holds CN=other"),
    # certbot's chain.pem swapped for the root alone: the issuer is named, and the file that has it
    "chain of the root alone": (lambda pki: (lambda a: (a.cert_pem, a.key_pem, pki.root.cert_pem))(pki.leaf()),
                                "the leaf's issuer CN=mailtls test intermediate is missing; the chain holds "
                                "CN=mailtls test root"),
    "oversized cert": (_mut(lambda c, k, ch: (c + b"\n" * (MAX_INPUT_BYTES + 1), k, ch)), "byte limit"),
    "oversized key": (_mut(lambda c, k, ch: (c, k + b" " * (MAX_INPUT_BYTES + 1), ch)), "byte limit"),
    "empty key": (_mut(lambda c, k, ch: (c, b"", ch)), "key: empty"),
    "certificate given as key": (_mut(lambda c, k, ch: (c, c, ch)), "key: contains certificate"),
}


@pytest.fixture
def corpus_host(host: MailHost, pki: PKI) -> MailHost:
    host.add_target("mx", chain_path=str(host.certs / "mx-chain.pem"))
    host.install("mx", pki.leaf(not_before=NOW - dt.timedelta(hours=1)))
    return host


def _run(host: MailHost, target: str, cert: bytes, key: bytes, chain: bytes | None) -> tuple[int, dict[str, object]]:
    d = host.root / "in"
    d.mkdir(exist_ok=True)
    (d / "c.pem").write_bytes(cert)
    (d / "k.pem").write_bytes(key)
    args = ["deploy", target, "--local", "--json", "--config", str(host.config_path),
            "--cert", str(d / "c.pem"), "--key", str(d / "k.pem")]
    if chain is not None:
        (d / "ch.pem").write_bytes(chain)
        args += ["--chain", str(d / "ch.pem")]
    res = CliRunner().invoke(cli, args)
    return res.exit_code, json.loads(res.output)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_material_exit_2_named_and_nothing_changed(corpus_host: MailHost, pki: PKI, case: str) -> None:
    make, reason = CASES[case]
    cert, key, chain = make(pki)
    before = corpus_host.snapshot()
    code, out = _run(corpus_host, "mx", cert, key, chain)
    assert code == 2, out
    assert out["outcome"] == "rejected"
    assert reason in str(out["error"]), out["error"]
    assert corpus_host.snapshot() == before
    assert corpus_host.stray_temps() == []
    assert corpus_host.reload.calls == []
    # The CLI starts the validate_command before it reads the input (it checks the
    # daemon's configuration, never the new files), so one early start may have logged
    # before the rejection killed it (test_early_validate checks that it is killed).
    assert len(corpus_host.validate.calls) <= 1
    # The deploy itself runs no command on bad input: the core, without an early start.
    corpus_host.validate.reset()
    r = run_local(corpus_host.config, "mx", cert, key, chain)
    assert r.outcome == "rejected" and reason in (r.error or ""), r
    assert corpus_host.reload.calls == [] and corpus_host.validate.calls == []
    assert corpus_host.snapshot() == before
    body = [ln for ln in key.decode(errors="replace").splitlines() if len(ln) > 20 and "-----" not in ln]
    assert not any(line in json.dumps(out) for line in body)


@pytest.mark.parametrize("target", ["nope", "../etc", "a/b", "mx/../../x", ".hidden", ""])
def test_unknown_or_path_like_target_exit_2(corpus_host: MailHost, pki: PKI, target: str) -> None:
    before = corpus_host.snapshot()
    code, out = _run(corpus_host, target, *_leaf(pki))
    assert code == 2 and "unknown target" in str(out["error"])
    assert corpus_host.snapshot() == before
    assert not (corpus_host.state / "targets" / "etc").exists()


@pytest.mark.parametrize("field,value,named", [
    ("reload_command", "postfix reload; rm -rf /", "targets.mx.reload_command"),
    ("validate_command", "postfix check | tee /tmp/x", "targets.mx.validate_command"),
    ("reload_command", "postfix $(id) reload", "targets.mx.reload_command"),
    ("cert_path", "certs/cert.pem", "targets.mx.cert_path"),
    ("key_path", "./key.pem", "targets.mx.key_path"),
])
def test_bad_config_refused_naming_the_field(corpus_host: MailHost, pki: PKI, field: str, value: str,
                                             named: str) -> None:
    """A broken targets file is the host's problem, not the input's: exit 1 (usage), as DESIGN.md says."""
    corpus_host.targets["mx"][field] = value
    corpus_host.write_config()
    before = corpus_host.snapshot()
    res = CliRunner().invoke(cli, ["deploy", "mx", "--local", "--config", str(corpus_host.config_path),
                                   "--cert", str(Path(__file__)), "--key", str(Path(__file__))])
    assert res.exit_code == 1
    assert named in res.output
    assert corpus_host.snapshot() == before
