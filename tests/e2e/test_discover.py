"""`mailtls discover` against real Postfix and Dovecot (2.3 on Debian 12, 2.4 in the
Debian 13 lane): the targets file it proposes is what the daemons serve, check-config
agrees with the daemons on it, and a deploy through it is verified on every listener.
And the cross-check: a target whose files the daemon does not read, and a file the
daemon serves that no target covers, are named, with --strict refusing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core import probe
from tests.support.daemons import Dovecot, Postfix
from tests.support.pki import PKI, Issued

pytestmark = pytest.mark.e2e


class Host:
    """A Postfix whose submission listener serves files of its own (master.cf -o), and
    a Dovecot reading the same files as Postfix's main.cf: three sets of listeners, two
    sets of files, three targets to find."""

    def __init__(self, root: Path, first: Issued, submission: Issued) -> None:
        self.root = root
        certs = root / "certs"
        certs.mkdir(parents=True)
        self.cert, self.key = certs / "mail.pem", certs / "mail.key"
        self.sub_cert, self.sub_key = certs / "submission.pem", certs / "submission.key"
        for (c, k), leaf in (((self.cert, self.key), first), ((self.sub_cert, self.sub_key), submission)):
            c.write_bytes(leaf.fullchain_pem)
            k.write_bytes(leaf.key_pem)
            k.chmod(0o600)
        self.postfix = Postfix(root, self.cert, self.key, submission_files=(self.sub_cert, self.sub_key))
        self.dovecot = Dovecot(root, self.cert, self.key)
        self.state = root / "state"

    def mailtls(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=self.root)

    def discover(self) -> tuple[str, dict[str, Any]]:
        p = self.mailtls("discover", "--postfix-config", str(self.postfix.dir), "--dovecot-config",
                         str(self.dovecot.conf), "--host", "mxd")
        assert p.returncode == 0, p.stderr
        return p.stdout, tomllib.loads(p.stdout)

    def write(self, proposed: dict[str, Any], name: str = "targets.toml") -> Path:
        """The proposal as an operator keeps it: plus a state_dir, verify polled briskly."""
        cfg = {**proposed, "state_dir": str(self.state)}
        for t in cfg["targets"].values():
            t["post_deploy_verify"].update({"timeout": 10, "interval": 0.1})
        path = self.root / name.replace(".toml", ".json")
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("discover")
    os.chmod(root, 0o755)
    host = Host(root, pki.leaf(), pki.leaf())
    host.postfix.start()
    host.dovecot.start()
    try:
        yield host
    finally:
        host.postfix.stop()
        host.dovecot.stop()


def test_discover_proposes_what_the_daemons_serve(mx: Host) -> None:
    text, proposed = mx.discover()
    targets = proposed["targets"]
    assert proposed["host"] == "mxd"
    assert set(targets) == {"postfix", "postfix-" + str(mx.postfix.submission_port), "dovecot"}, targets

    main, sub, imap = targets["postfix"], targets[f"postfix-{mx.postfix.submission_port}"], targets["dovecot"]
    assert (main["mode"], main["instance"]) == ("postfix", str(mx.postfix.dir))
    assert (main["cert_path"], main["key_path"]) == (str(mx.cert), str(mx.key))
    assert main["reload_command"] == f"postfix -c {mx.postfix.dir} reload"
    assert main["validate_command"] == f"postfix -c {mx.postfix.dir} check"
    assert main["post_deploy_verify"]["endpoints"] == [
        {"endpoint": f"127.0.0.1:{mx.postfix.smtp_port}", "protocol": "smtp"},
        {"endpoint": f"127.0.0.1:{mx.postfix.smtps_port}", "protocol": "smtps"}]
    assert (sub["cert_path"], sub["key_path"]) == (str(mx.sub_cert), str(mx.sub_key))
    assert sub["post_deploy_verify"]["endpoints"] == [
        {"endpoint": f"127.0.0.1:{mx.postfix.submission_port}", "protocol": "smtp"}]

    assert (imap["mode"], imap["instance"]) == ("dovecot", str(mx.dovecot.conf))
    assert (imap["cert_path"], imap["key_path"]) == (str(mx.cert), str(mx.key))  # the key path, even on 2.3
    assert imap["reload_command"] == f"doveadm -c {mx.dovecot.conf} reload"
    ports = mx.dovecot.ports
    assert imap["post_deploy_verify"]["endpoints"] == [
        {"endpoint": f"127.0.0.1:{ports[p]}", "protocol": p} for p in ("imap", "imaps", "pop3", "pop3s")]
    # what it found, said in comments an operator reads before using the file
    version = ".".join(str(n) for n in mx.dovecot.version[:2])
    assert f"# dovecot {version}" in text and "# postfix 3." in text
    assert "password" not in text  # doveconf -P was read for the key paths; the passdb's secret stays there


def test_check_config_agrees_and_a_deploy_through_it_is_verified_everywhere(mx: Host, pki: PKI) -> None:
    _, proposed = mx.discover()
    cfg = mx.write(proposed)
    p = mx.mailtls("check-config", "--config", str(cfg), "--strict", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["warnings"] == []

    new = pki.leaf()
    (mx.root / "new.pem").write_bytes(new.fullchain_pem)
    (mx.root / "new.key").write_bytes(new.key_pem)
    for name in ("postfix", "dovecot"):  # they share the files: the second finds them in place, reloads, verifies
        p = mx.mailtls("deploy", name, "--local", "--config", str(cfg), "--cert", "new.pem", "--key", "new.key",
                       "--json")
        out = json.loads(p.stdout)
        assert p.returncode == 0 and out["outcome"] == "deployed", p.stdout + p.stderr
    for port, proto in ((mx.postfix.smtp_port, "smtp"), (mx.postfix.smtps_port, "smtps"),
                        *((mx.dovecot.ports[k], k) for k in ("imap", "imaps", "pop3", "pop3s"))):
        assert probe.probe("127.0.0.1", port, proto).fingerprint == new.fingerprint, (port, proto)
    assert probe.probe("127.0.0.1", mx.postfix.submission_port, "smtp").fingerprint != new.fingerprint


def test_the_cross_check_names_both_paths_and_strict_refuses(mx: Host) -> None:
    _, proposed = mx.discover()
    wrong = mx.root / "certs" / "not-read.pem"
    sub = f"postfix-{mx.postfix.submission_port}"
    del proposed["targets"][sub]  # the submission files: served, covered by no target
    proposed["targets"]["postfix"]["cert_path"] = str(wrong)  # a file Postfix does not read
    cfg = mx.write(proposed, "wrong.toml")

    p = mx.mailtls("check-config", "--config", str(cfg))
    assert p.returncode == 0, p.stderr  # warnings only
    warnings = [line for line in p.stderr.splitlines() if line.startswith("mailtls: warning:")]
    assert len(warnings) == 3, p.stderr
    assert any("target 'postfix'" in w and str(wrong) in w and "does not read" in w and str(mx.cert) in w
               for w in warnings), warnings
    assert any(str(mx.sub_cert) in w and str(mx.sub_key) in w and "no target covers" in w
               and str(mx.postfix.submission_port) in w for w in warnings), warnings
    assert any(str(mx.cert) in w and "no target covers" in w for w in warnings), warnings  # main.cf's, now uncovered

    strict = mx.mailtls("check-config", "--config", str(cfg), "--strict")
    assert strict.returncode == 1 and strict.stderr.count("mailtls: error:") == 3, strict.stderr


def test_an_instance_that_cannot_be_read_is_a_clear_error(mx: Host, tmp_path: Path) -> None:
    p = mx.mailtls("discover", "--dovecot-config", str(tmp_path / "missing.conf"))
    assert p.returncode == 1 and "dovecot" in p.stderr and "missing.conf" in p.stderr, p.stderr
    assert p.stdout == ""


# --- what an operator's configuration may hold, read as the daemon reads it -------------

def _postfix_scratch(root: Path, main: str, master: str) -> Path:
    """A Postfix config directory postconf reads (nothing is started)."""
    d = root / "pf"
    d.mkdir()
    (d / "main.cf").write_text(f"compatibility_level = 3.6\ninet_interfaces = loopback-only\n{main}\n")
    (d / "master.cf").write_text(master)
    return d


def test_postfix_a_service_overriding_only_its_certificate_keeps_its_key_with_it(tmp_path: Path, pki: PKI) -> None:
    """Postfix expands smtpd_tls_key_file's default ($smtpd_tls_cert_file) per service,
    after its -o overrides: the submission key is in submission.pem, not main.cf's key."""
    from mailtls_tasks.daemons import postfix

    d = _postfix_scratch(tmp_path, "smtpd_tls_cert_file = /etc/ssl/main.pem\nsmtpd_tls_security_level = may\n"
                         "smtpd_tls_wrappermode = NO",
                         "127.0.0.1:2525 inet n - n - - smtpd\n"
                         "127.0.0.1:5870 inet n - n - - smtpd -o smtpd_tls_cert_file=/etc/ssl/sub.pem\n"
                         "127.0.0.1:4650 inet n - n - - smtpd -o smtpd_tls_wrappermode=YES\n")
    (found,) = postfix.discover(str(d))
    by_port = {li.port: (s.files.slots, li.protocol) for s in found.served for li in s.listeners}
    assert by_port[5870][0] == (postfix.FileSlot(combined="/etc/ssl/sub.pem"),)
    assert by_port[2525][0] == (postfix.FileSlot(combined="/etc/ssl/main.pem"),)
    assert by_port[4650][1] == "smtps"  # YES, as Postfix reads its booleans: any case


def test_postfix_chain_files_are_read_as_postfix_groups_them(tmp_path: Path, pki: PKI) -> None:
    from mailtls_tasks.daemons import postfix

    leaf = pki.leaf()
    key, cert, chain = tmp_path / "key.pem", tmp_path / "leaf.pem", tmp_path / "chain.pem"
    key.write_bytes(leaf.key_pem)
    cert.write_bytes(leaf.cert_pem)
    chain.write_bytes(leaf.chain_pem)
    d = _postfix_scratch(tmp_path, f"smtpd_tls_chain_files = {key}, {cert}, {chain}\n"
                         "smtpd_tls_security_level = may", "127.0.0.1:2525 inet n - n - - smtpd\n")
    (found,) = postfix.discover(str(d))
    (served,) = found.served
    assert served.files.slots == (postfix.FileSlot(cert=str(cert), key=str(key), chain=str(chain),
                                                   key_type="ecdsa"),)
    key.unlink()  # what it cannot read, it does not guess: no target, a note saying why
    (found,) = postfix.discover(str(d))
    assert found.served == [] and any(f"cannot read {key}" in n for n in found.notes), found.notes


def test_dovecot_per_protocol_files_odd_bytes_and_inline_keys(tmp_path: Path, pki: PKI) -> None:
    """A protocol block of its own gets a target of its own for its listeners; a
    setting in another charset does not stop the reading; an inline key is never shown."""
    from mailtls_tasks.core.discover import render
    from mailtls_tasks.daemons import dovecot

    leaf = pki.leaf()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(leaf.fullchain_pem)
    key.write_bytes(leaf.key_pem)
    d = Dovecot(tmp_path, cert, key)
    is24 = d.version >= (2, 4)
    pop = ("protocol pop3 {\n  ssl_server_cert_file = /etc/ssl/pop.pem\n  ssl_server_key_file = /etc/ssl/pop.key\n}\n"
           if is24 else "protocol pop3 {\n  ssl_cert = </etc/ssl/pop.pem\n  ssl_key = </etc/ssl/pop.key\n}\n")
    d.conf.write_bytes(d.conf.read_bytes() + b"login_greeting = Gr\xfc\xdfe\n" + pop.encode())
    (found,) = dovecot.discover(str(d.conf))
    by_port = {li.port: s.files.paths() for s in found.served for li in s.listeners}
    assert by_port[d.ports["pop3"]] == by_port[d.ports["pop3s"]] == ("/etc/ssl/pop.pem", "/etc/ssl/pop.key")
    assert by_port[d.ports["imaps"]] == (str(cert), str(key))
    if not is24:  # 2.3 takes a PEM inline (no "<"): never printed, never used as a path
        d.conf.write_text(d.conf.read_text(errors="replace").replace(pop, "") + "local_name inline.test {\n"
                          "  ssl_cert = </etc/ssl/i.pem\n  ssl_key = -----BEGIN PRIVATE KEY-----SECRET\n}\n")
        (found,) = dovecot.discover(str(d.conf))
        text = render([found], "mx")
        assert "SECRET" not in text and "BEGIN PRIVATE" not in text
        assert any("inline" in n for n in found.notes), found.notes


def test_the_cross_check_takes_an_instance_however_it_is_spelled(mx: Host) -> None:
    _, proposed = mx.discover()
    for t in proposed["targets"].values():
        t["instance"] += "/" if t["mode"] == "postfix" else ""  # /etc/postfix/ is /etc/postfix
    cfg = mx.write(proposed, "slash.toml")
    p = mx.mailtls("check-config", "--config", str(cfg), "--strict", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["warnings"] == [], p.stdout + p.stderr
