"""What burns mail admins, against real Postfix and Dovecot: a listener left on the old
certificate, a missing intermediate, RSA + ECDSA updated together (or not at all), the
single-file layout with no key/cert mismatch window, listener hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.audit import audit_target
from mailtls_tasks.core.config import load_config
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.material import key_matches_cert
from tests.support.daemons import Dovecot, Postfix
from tests.support.pki import PKI, Issued, make_pki
from tests.support.services import REPO, require
from tests.support.stack import Wrapper

pytestmark = pytest.mark.e2e
NAME = "mail.depth.test"


class Depth:
    """One mail host: a Postfix with a submission port overriding its cert files, a
    dual-certificate Postfix (smtpd_tls_chain_files) and Dovecot (ssl_alt_cert), and a
    single-file Postfix."""

    def __init__(self, root: Path, ec: PKI, rsa: PKI) -> None:
        self.root, self.ec, self.rsa = root, ec, rsa
        os.chmod(root, 0o755)
        c = root / "certs"
        for d in ("plain", "stale", "dual-pf", "dual-dv", "single"):
            (c / d).mkdir(parents=True)
        self.first = ec.leaf(NAME)
        self.rsa_first = rsa.leaf(NAME, kind="rsa")
        self._write(c / "plain" / "cert.pem", self.first.fullchain_pem, c / "plain" / "key.pem", self.first.key_pem)
        # what the submission listener reads: a copy, that no target names
        self._write(c / "stale" / "cert.pem", self.first.fullchain_pem, c / "stale" / "key.pem", self.first.key_pem)
        for d in ("dual-pf", "dual-dv"):
            self._write(c / d / "rsa-cert.pem", self.rsa_first.fullchain_pem, c / d / "rsa-key.pem",
                        self.rsa_first.key_pem)
            self._write(c / d / "ec-cert.pem", self.first.fullchain_pem, c / d / "ec-key.pem", self.first.key_pem)
        (c / "single" / "mail.pem").write_bytes(self.first.key_pem + self.first.fullchain_pem)
        os.chmod(c / "single" / "mail.pem", 0o600)
        self.plain = Postfix(root / "pf-plain", c / "plain" / "cert.pem", c / "plain" / "key.pem",
                             submission_files=(c / "stale" / "cert.pem", c / "stale" / "key.pem"))
        self.dual_pf = Postfix(root / "pf-dual", c / "dual-pf" / "rsa-cert.pem", c / "dual-pf" / "rsa-key.pem",
                               chain_files=[c / "dual-pf" / "rsa-key.pem", c / "dual-pf" / "rsa-cert.pem",
                                            c / "dual-pf" / "ec-key.pem", c / "dual-pf" / "ec-cert.pem"])
        self.single = Postfix(root / "pf-single", c / "single" / "mail.pem", c / "single" / "mail.pem",
                              chain_files=[c / "single" / "mail.pem"])
        self.dual_dv = Dovecot(root / "dv-dual", c / "dual-dv" / "rsa-cert.pem", c / "dual-dv" / "rsa-key.pem",
                               alt=(c / "dual-dv" / "ec-cert.pem", c / "dual-dv" / "ec-key.pem"))
        for d in (root / "pf-plain", root / "pf-dual", root / "pf-single", root / "dv-dual"):
            os.chmod(d, 0o755)
        self.bin = root / "bin"
        self.bin.mkdir()
        w = {n: Wrapper(self.bin, n, cmd) for n, cmd in (
            ("plain-reload", self.plain.command("reload")), ("plain-check", self.plain.command("check")),
            ("dualpf-reload", self.dual_pf.command("reload")), ("dualpf-check", self.dual_pf.command("check")),
            ("single-reload", self.single.command("reload")), ("single-check", self.single.command("check")),
            ("dualdv-reload", self.dual_dv.reload_command()), ("dualdv-check", self.dual_dv.validate_command()))}
        self.wrappers = w
        self.anchors = root / "ca.pem"
        self.anchors.write_bytes(ec.root.cert_pem + rsa.root.cert_pem)

        def verify(*eps: tuple[int | None, str]) -> dict[str, Any]:
            return {"enabled": True, "timeout": "3s", "interval": "100ms",
                    "endpoints": [{"endpoint": f"127.0.0.1:{p}", "protocol": pr, "server_name": NAME}
                                  for p, pr in eps]}

        targets = {
            "plain": {"mode": "postfix", "cert_path": str(c / "plain" / "cert.pem"),
                      "key_path": str(c / "plain" / "key.pem"), "names": [NAME],
                      "reload_command": str(w["plain-reload"].path), "validate_command": str(w["plain-check"].path),
                      "post_deploy_verify": verify((self.plain.smtp_port, "smtp"), (self.plain.smtps_port, "smtps"),
                                                   (self.plain.submission_port, "smtp"))},
            "plain-anchored": {"mode": "postfix", "cert_path": str(c / "plain" / "cert.pem"),
                               "key_path": str(c / "plain" / "key.pem"), "names": [NAME],
                               "trust_anchors": str(self.anchors), "reload_command": "/bin/true",
                               "validate_command": ""},
            "dual-pf": {"mode": "postfix", "cert_path": str(c / "dual-pf" / "rsa-cert.pem"),
                        "key_path": str(c / "dual-pf" / "rsa-key.pem"), "key_type": "rsa",
                        "alt": {"cert_path": str(c / "dual-pf" / "ec-cert.pem"),
                                "key_path": str(c / "dual-pf" / "ec-key.pem"), "key_type": "ecdsa"},
                        "names": [NAME], "trust_anchors": str(self.anchors),
                        "reload_command": str(w["dualpf-reload"].path), "validate_command": str(w["dualpf-check"].path),
                        "post_deploy_verify": verify((self.dual_pf.smtp_port, "smtp"),
                                                     (self.dual_pf.smtps_port, "smtps"))},
            # the same, with no `names`: the chain is checked for the leaf's own name
            "dual-pf-nameless": {"mode": "postfix", "cert_path": str(c / "dual-pf" / "rsa-cert.pem"),
                                 "key_path": str(c / "dual-pf" / "rsa-key.pem"), "key_type": "rsa",
                                 "alt": {"cert_path": str(c / "dual-pf" / "ec-cert.pem"),
                                         "key_path": str(c / "dual-pf" / "ec-key.pem"), "key_type": "ecdsa"},
                                 "trust_anchors": str(self.anchors), "reload_command": str(w["dualpf-reload"].path),
                                 "validate_command": str(w["dualpf-check"].path),
                                 "post_deploy_verify": verify((self.dual_pf.smtp_port, "smtp"))},
            "dual-dv": {"mode": "dovecot", "cert_path": str(c / "dual-dv" / "rsa-cert.pem"),
                        "key_path": str(c / "dual-dv" / "rsa-key.pem"),
                        "alt": {"cert_path": str(c / "dual-dv" / "ec-cert.pem"),
                                "key_path": str(c / "dual-dv" / "ec-key.pem")},
                        "names": [NAME], "reload_command": str(w["dualdv-reload"].path),
                        "validate_command": str(w["dualdv-check"].path),
                        "post_deploy_verify": verify(*((self.dual_dv.ports[p], p)
                                                       for p in ("imap", "imaps", "pop3", "pop3s")))},
            "single": {"mode": "postfix", "combined_path": str(c / "single" / "mail.pem"), "names": [NAME],
                       "reload_command": str(w["single-reload"].path),
                       "validate_command": str(w["single-check"].path),
                       "post_deploy_verify": verify((self.single.smtp_port, "smtp"),
                                                    (self.single.smtps_port, "smtps"))},
        }
        self.config = root / "targets.json"
        self.config.write_text(json.dumps({"host": "depth", "state_dir": str(root / "state"), "targets": targets}))

    @staticmethod
    def _write(cert: Path, cert_pem: bytes, key: Path, key_pem: bytes) -> None:
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        os.chmod(key, 0o600)

    def start(self) -> None:
        for d in (self.plain, self.dual_pf, self.single, self.dual_dv):
            d.start()

    def stop(self) -> None:
        for d in (self.plain, self.dual_pf, self.single, self.dual_dv):
            d.stop()

    def deploy(self, target: str, leaf: Issued, *, chain: bool = True, also: Issued | None = None) -> Any:
        cfg = load_config(str(self.config))
        cert = leaf.fullchain_pem if chain else leaf.cert_pem
        extra = [(also.fullchain_pem, also.key_pem, None)] if also else None
        return run_local(cfg, target, cert, leaf.key_pem, also=extra, lock_timeout=5)


def served(port: int, proto: str, algorithm: str | None = None) -> str:
    return probe.probe("127.0.0.1", port, proto, NAME, algorithm=algorithm).fingerprint


@pytest.fixture(scope="module")
def depth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Depth]:
    d = Depth(tmp_path_factory.mktemp("depth"), make_pki("ec"), make_pki("rsa"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_a_listener_left_on_the_old_certificate_rolls_the_deploy_back(depth: Depth) -> None:
    new = depth.ec.leaf(NAME)
    res = depth.deploy("plain", new)
    assert res.outcome == "rolled_back", res
    assert f"127.0.0.1:{depth.plain.submission_port} (SNI {NAME}) did not serve" in (res.error or "")
    for port, proto in ((depth.plain.smtp_port, "smtp"), (depth.plain.smtps_port, "smtps"),
                        (depth.plain.submission_port, "smtp")):
        assert served(port, proto) == depth.first.fingerprint  # every listener re-verified on the old one
    assert (depth.root / "certs" / "plain" / "cert.pem").read_bytes() == depth.first.fullchain_pem


def test_a_leaf_without_its_intermediate_is_rejected_naming_the_issuer(depth: Depth) -> None:
    before = (depth.root / "certs" / "plain" / "cert.pem").read_bytes()
    res = depth.deploy("plain", depth.ec.leaf(NAME), chain=False)
    assert res.outcome == "rejected", res
    assert "CN=mailtls test intermediate" in (res.error or "") and "fullchain.pem" in (res.error or "")
    assert (depth.root / "certs" / "plain" / "cert.pem").read_bytes() == before


def test_with_trust_anchors_the_whole_path_must_validate(depth: Depth) -> None:
    other = make_pki("ec").leaf(NAME)  # a chain that is complete, but from a CA the target does not trust
    res = depth.deploy("plain-anchored", other)
    assert res.outcome == "rejected" and "does not validate to trust_anchors" in (res.error or ""), res
    wrong_name = depth.ec.leaf("other.depth.test")
    res = depth.deploy("plain-anchored", wrong_name)
    assert res.outcome == "rejected" and "does not cover mail.depth.test" in (res.error or ""), res


def test_fullchain_given_as_chain_is_accepted(depth: Depth, tmp_path: Path) -> None:
    leaf = depth.ec.leaf(NAME)
    cfg = load_config(str(depth.config))
    res = run_local(cfg, "plain-anchored", leaf.cert_pem, leaf.key_pem, leaf.fullchain_pem, lock_timeout=5)
    assert res.outcome == "deployed", res.error


def test_dual_rsa_and_ecdsa_deployed_and_verified_per_algorithm(depth: Depth) -> None:
    rsa_new, ec_new = depth.rsa.leaf(NAME, kind="rsa"), depth.ec.leaf(NAME)
    for target, ports in (("dual-pf", ((depth.dual_pf.smtp_port, "smtp"), (depth.dual_pf.smtps_port, "smtps"))),
                          ("dual-dv", tuple((depth.dual_dv.ports[p], p) for p in ("imaps", "pop3")))):
        res = depth.deploy(target, ec_new, also=rsa_new)  # any order: matched by key type
        assert res.outcome == "deployed", res.error
        for port, proto in ports:
            assert served(port, proto, "rsa") == rsa_new.fingerprint
            assert served(port, proto, "ecdsa") == ec_new.fingerprint
        # the audit looks at both certificates: each file on disk, each listener once per algorithm
        cfg = load_config(str(depth.config))
        a = audit_target(cfg.targets[target], Journal(cfg.state_dir), "depth", warn_days=5)
        assert not a.drift, a.issues
        if target == "dual-pf":  # (dual-dv has no trust_anchors: the test CA is not in the system store)
            assert a.status == "ok", a.issues
        assert {la.endpoint.rsplit(" ", 1)[-1] for la in a.listeners} == {"(RSA)", "(ECDSA)"}
        assert {la.served_fingerprint for la in a.listeners} == {rsa_new.fingerprint, ec_new.fingerprint}
    # trust_anchors and no names: validated for the leaf's own name (not refused as a client cert)
    res = depth.deploy("dual-pf-nameless", depth.ec.leaf(NAME), also=depth.rsa.leaf(NAME, kind="rsa"))
    assert res.outcome == "deployed", res.error


def test_dual_target_needs_both_algorithms(depth: Depth) -> None:
    res = depth.deploy("dual-dv", depth.ec.leaf(NAME))
    assert res.outcome == "rejected" and "takes RSA and ECDSA certificates; got 1 (ECDSA)" in (res.error or ""), res


def test_dual_failure_after_the_first_algorithm_restores_both_byte_exact(depth: Depth) -> None:
    """The ECDSA key cannot be replaced (a mount point over it: rename fails EBUSY) after
    the RSA pair went live: both are back, byte-exact, and served."""
    unshare = require("unshare")
    c = depth.root / "certs" / "dual-pf"
    before = {p.name: p.read_bytes() for p in c.iterdir()}
    served_before = (served(depth.dual_pf.smtp_port, "smtp", "rsa"), served(depth.dual_pf.smtp_port, "smtp", "ecdsa"))
    rsa_new, ec_new = depth.rsa.leaf(NAME, kind="rsa"), depth.ec.leaf(NAME)
    files = {"r.pem": rsa_new.fullchain_pem, "rk.pem": rsa_new.key_pem, "e.pem": ec_new.fullchain_pem,
             "ek.pem": ec_new.key_pem, "pinned-ec-key.pem": (c / "ec-key.pem").read_bytes()}
    for n, data in files.items():
        (depth.root / n).write_bytes(data)
    pin = f"mount --bind {depth.root / 'pinned-ec-key.pem'} {c / 'ec-key.pem'} && exec \"$@\""
    p = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", pin, "sh", sys.executable, "-m",
                        "mailtls_tasks.cli", "deploy", "dual-pf", "--local", "--json", "--cert", "r.pem", "--key",
                        "rk.pem", "--cert", "e.pem", "--key", "ek.pem"], cwd=depth.root, capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, "MAILTLS_CONFIG": str(depth.config), "PYTHONPATH": str(REPO)})
    out = json.loads(p.stdout)
    assert p.returncode == 3 and out["outcome"] == "rolled_back", p.stdout + p.stderr
    assert "alt_key: cannot replace" in out["error"]
    assert {q.name: q.read_bytes() for q in c.iterdir() if ".mailtls-" not in q.name} == before
    assert (served(depth.dual_pf.smtp_port, "smtp", "rsa"), served(depth.dual_pf.smtp_port, "smtp", "ecdsa")) == \
        served_before


def test_single_file_layout_changes_key_and_chain_in_one_rename(depth: Depth) -> None:
    """The one file holds the key: found 0644 (readable by every user), it is written
    0600, and the result says so -- the rule for every file that holds a key."""
    combined = depth.root / "certs" / "single" / "mail.pem"
    os.chmod(combined, 0o644)
    new = depth.ec.leaf(NAME)
    res = depth.deploy("single", new)
    assert res.outcome == "deployed", res.error
    assert any(f"{combined} holds a private key and was mode 0644" in n and "written 0600" in n
               for n in res.notes), res.notes
    data = (depth.root / "certs" / "single" / "mail.pem").read_bytes()
    assert data == new.key_pem + new.fullchain_pem  # key first, as smtpd_tls_chain_files wants
    assert oct((depth.root / "certs" / "single" / "mail.pem").stat().st_mode & 0o777) == "0o600"
    assert key_matches_cert(data, data)
    assert served(depth.single.smtp_port, "smtp") == new.fingerprint
    from mailtls_tasks.core.journal import Journal

    rec = Journal(str(depth.root / "state")).load("single", res.deploy_id)
    assert rec is not None and [e.role for e in rec.files] == ["combined"]  # one file, one rename

    os.chmod(combined, 0o644)  # loosened by hand: the same bytes again are not "unchanged"
    again = depth.deploy("single", new)
    assert again.outcome == "deployed" and combined.stat().st_mode & 0o777 == 0o600, again
    assert combined.read_bytes() == data and served(depth.single.smtp_port, "smtp") == new.fingerprint
    assert depth.deploy("single", new).outcome == "unchanged"  # 0600 kept: nothing to do


def test_check_config_suggests_the_listeners_a_mode_usually_has(depth: Depth) -> None:
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "check-config", "--config", str(depth.config),
                        "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    data = json.loads(p.stdout)["targets"]
    assert data["single"]["suggested_endpoints"] == ["127.0.0.1:25 (smtp)", "127.0.0.1:465 (smtps)",
                                                     "127.0.0.1:587 (submission)"]
    assert "127.0.0.1:993 (imaps)" in data["dual-dv"]["suggested_endpoints"]
