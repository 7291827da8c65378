"""Exim's pure parts: its lists, the init script's listener options, the config rules
of an exim target, the key's group, and the HUP's refusal of a pid that is not Exim's.
The real Exim (4.96 and 4.98) is in tests/exim."""

from __future__ import annotations

import dataclasses
import grp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mailtls_tasks import daemons
from mailtls_tasks.core import files
from mailtls_tasks.core.config import parse_config
from mailtls_tasks.core.journal import DeployRecord
from mailtls_tasks.core.steps.stage import new_gid, new_mode
from mailtls_tasks.daemons import exim
from mailtls_tasks.errors import ConfigError


def cfg(**target: object) -> dict[str, object]:
    return {"host": "mx1", "state_dir": "/var/lib/mailtls", "targets": {"t": {"mode": "exim", **target}}}


def test_exim_lists_split_as_exim_splits_them() -> None:
    assert exim.exim_list("/etc/exim4/rsa.crt : /etc/exim4/ec.crt") == ["/etc/exim4/rsa.crt", "/etc/exim4/ec.crt"]
    assert exim.exim_list("<; 127.0.0.1 ; ::1") == ["127.0.0.1", "::1"]
    assert exim.exim_list("a::b : c") == ["a:b", "c"]  # a doubled colon is a colon
    assert exim.exim_list("") == [] and exim.exim_list("smtp") == ["smtp"]


def test_interfaces_with_and_without_ports() -> None:
    assert exim._interface("127.0.0.1") == ("127.0.0.1", None)
    assert exim._interface("127.0.0.1.465") == ("127.0.0.1", 465)
    assert exim._interface("::1.25") == ("::1", 25)
    assert exim._interface("[::1]:587") == ("::1", 587)
    assert exim._interface("::1") == ("::1", None)


def test_the_init_scripts_listener_options_are_read_not_run(tmp_path: Path) -> None:
    """README.Debian's way to open 465: SMTPLISTENEROPTIONS='-oX 465:25 -oP ...'. The
    file is a shell file: read, never sourced."""
    f = tmp_path / "exim4"
    f.write_text("QUEUERUNNER='combined'\n# SMTPLISTENEROPTIONS='-oX 1:2'\nSMTPLISTENEROPTIONS='-oX 465:25:587 "
                 "-oP /run/exim4/exim.pid'\n")
    o = exim.listener_options(str(f))
    assert (o.ports, o.interfaces, o.pid_file) == ("465 : 25 : 587", None, "/run/exim4/exim.pid")
    assert o.source.endswith("exim4 SMTPLISTENEROPTIONS")
    f.write_text('SMTPLISTENEROPTIONS="-oX <;127.0.0.1.25;127.0.0.1.465"\n')
    o = exim.listener_options(str(f))
    assert (o.ports, o.interfaces, o.pid_file) == (None, "<; 127.0.0.1.25 ; 127.0.0.1.465", None)
    # sorted item by item, as Exim's daemon does: ports replace daemon_smtp_ports, the rest local_interfaces
    f.write_text("SMTPLISTENEROPTIONS='-oX <;25;465;127.0.0.1;::1 -oP /run/x.pid'\n")
    o = exim.listener_options(str(f))
    assert (o.ports, o.interfaces) == ("25 : 465", "<; 127.0.0.1 ; ::1")
    f.write_text("SMTPLISTENEROPTIONS='-oX smtp:465'\n")
    assert exim.listener_options(str(f)).ports == "smtp : 465"
    # built by the shell: said, not guessed
    f.write_text("SMTPLISTENEROPTIONS='-oX 25'\nSMTPLISTENEROPTIONS=\"$SMTPLISTENEROPTIONS -oP /run/exim4/exim.pid\"\n")
    o = exim.listener_options(str(f))
    assert o.ports is None and "built by the shell" in o.unread
    f.write_text("SMTPLISTENEROPTIONS=''\n")
    assert exim.listener_options(str(f)) == exim.ListenerOptions()
    assert exim.listener_options(str(tmp_path / "missing")) == exim.ListenerOptions()


def test_an_exim_target_has_debians_defaults_and_reloads_by_signal() -> None:
    t = parse_config(cfg()).target("t")
    assert (t.cert_path, t.key_path, t.chain_path) == ("/etc/exim4/exim.crt", "/etc/exim4/exim.key", "")
    assert (t.reload_command, t.pid_file, t.validate_command) == ("", "/run/exim4/exim.pid", "exim4 -bV")
    assert t.reload_what == "reload (SIGHUP to the pid in /run/exim4/exim.pid)"
    t2 = parse_config(cfg(reload_command="/etc/init.d/exim4 reload")).target("t")
    assert t2.reload_what == "reload_command" and t2.reload_once != t.reload_once


@pytest.mark.parametrize(("body", "message"), [
    ({"chain_path": "/etc/exim4/chain.pem"}, r"chain_path: exim reads the chain from the certificate file"),
    ({"alt": {"cert_path": "/etc/exim4/ec.crt", "key_path": "/etc/exim4/ec.key", "chain_path": "/etc/exim4/c.pem"}},
     r"chain_path: exim reads the chain"),
    ({"pid_file": ""}, r"pid_file: mode exim reloads by SIGHUP"),
    ({"pid_file": "run/exim.pid"}, r"pid_file"),
    ({"sni": {}, "names": ["mail.example.net"]}, r"sni: exim picks a certificate by SNI through an expanded"),
])
def test_what_an_exim_target_cannot_be(body: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg(**body))


def test_other_modes_keep_their_non_empty_reload_and_no_pid_file() -> None:
    with pytest.raises(ConfigError, match=r"reload_command: must not be empty"):
        parse_config({"host": "mx1", "targets": {"t": {"mode": "postfix", "reload_command": " "}}})
    with pytest.raises(ConfigError, match=r"pid_file: mode dovecot reloads by its reload_command only"):
        parse_config({"host": "mx1", "targets": {"t": {"mode": "dovecot", "pid_file": "/run/x.pid"}}})


def _state(path: Path) -> files.FileState:
    return files.inspect(str(path))[0]


def test_a_key_exim_reads_as_its_group_is_0640_with_that_group(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian-exim is not on this machine: the rule is shown with a group that is
    (the mode rule itself is the same code)."""
    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() else "mail"
    gid = grp.getgrnam(group).gr_gid
    monkeypatch.setitem(daemons.DAEMONS, "exim", dataclasses.replace(daemons.get("exim"), key_group=group))
    t = parse_config(cfg(cert_path=str(tmp_path / "exim.crt"), key_path=str(tmp_path / "exim.key"))).target("t")
    rec = DeployRecord(deploy_id="d", target="t")
    new = _state(tmp_path / "exim.key")
    assert (new_mode(t, "key", new, rec), new_gid(t, "key", new, None)) == (0o640, gid)
    key = tmp_path / "exim.key"
    key.write_bytes(b"k")
    key.chmod(0o640)
    kept = _state(key)  # root:<its group> 0640 as found: kept as it is
    assert (new_mode(t, "key", kept, rec), new_gid(t, "key", kept, None)) == (0o640, kept.gid)
    key.chmod(0o644)
    loose = _state(key)
    assert (new_mode(t, "key", loose, rec), new_gid(t, "key", loose, None)) == (0o640, gid)
    assert any(f"0640 with group {group}" in n for n in rec.notes)
    assert new_mode(t, "cert", _state(tmp_path / "exim.crt"), rec) == 0o644  # certificates as ever
    # a group the target names wins; a host without the daemon's group gets 0600
    named = parse_config(cfg(key_path=str(key), group="0")).target("t")
    assert new_gid(named, "key", loose, 0) == 0 and new_mode(named, "key", loose, rec) == 0o600
    monkeypatch.setitem(daemons.DAEMONS, "exim", dataclasses.replace(daemons.get("exim"), key_group="no-such-grp"))
    assert new_mode(t, "key", new, rec) == 0o600 and new_gid(t, "key", new, None) is None


def test_a_hup_goes_only_to_an_exim(tmp_path: Path) -> None:
    """A stale pid file whose number a process of another program now has: refused,
    and that process is not signalled."""
    other = subprocess.Popen(["sleep", "30"])
    comm = Path(f"/proc/{other.pid}/comm")
    while comm.read_text().strip() != "sleep":  # until the child has exec'd
        time.sleep(0.01)
    try:
        pid_file = tmp_path / "exim.pid"
        pid_file.write_text(f"{other.pid}\n")
        res = exim.hup(str(pid_file))
        assert not res.ok and "is sleep, not Exim" in res.output_tail and "stale pid file" in res.output_tail
        assert other.poll() is None  # not signalled: a HUP would have ended sleep
        pid_file.write_text("garbage")
        assert "holds no pid" in exim.hup(str(pid_file)).output_tail
        assert "cannot read the pid file" in exim.hup(str(tmp_path / "none.pid")).output_tail
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    pid_file.write_text(f"{other.pid}\n")
    assert "Exim is not running" in exim.hup(str(pid_file)).output_tail


def test_the_example_targets_files_exim_block_is_a_valid_target() -> None:
    """The commented [targets.exim] of workers/targets.example.toml, uncommented, loads
    (and its directory is one the units may write)."""
    import tomllib

    text = (Path(__file__).resolve().parents[2] / "workers" / "targets.example.toml").read_text()
    block = text[text.index("# [targets.exim]"):].split("\n\n")[0]
    body = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    t = parse_config({"host": "mx1", "targets": body["targets"]}).target("exim")
    assert (t.mode, t.cert_path, t.pid_file) == ("exim", "/etc/exim4/exim.crt", "/run/exim4/exim.pid")
    unit = (Path(__file__).resolve().parents[2] / "workers" / "mailtls-worker.service").read_text()
    assert "-/etc/exim4" in unit


def _bp(**values: str) -> str:
    base = {"configure_file": "/etc/exim4/x.conf", "daemon_smtp_ports": "25 : 465", "tls_on_connect_ports": "465",
            "local_interfaces": "<; 127.0.0.1 ; ::1", "tls_advertise_hosts": "*",
            "tls_certificate": "/etc/exim4/exim.crt", "tls_privatekey": "/etc/exim4/exim.key",
            "pid_file_path": "/run/exim4/exim.pid", "exim_version": "4.98"}
    base.update(values)
    return base.pop("configure_file") + "\n" + "\n".join(f"{k} = {v}" for k, v in base.items()) + "\n"


@pytest.mark.parametrize(("advertise", "expected"), [
    ("*", {("127.0.0.1:25", "smtp"), ("127.0.0.1:465", "smtps"), ("[::1]:25", "smtp"), ("[::1]:465", "smtps")}),
    ("!*", {("127.0.0.1:465", "smtps"), ("[::1]:465", "smtps")}),
    ("", {("127.0.0.1:465", "smtps"), ("[::1]:465", "smtps")}),
    ("!127.0.0.1 : *", {("127.0.0.1:465", "smtps"), ("[::1]:465", "smtps")}),
])
def test_starttls_listeners_only_where_the_loopback_is_seen_to_be_offered_it(
        monkeypatch: pytest.MonkeyPatch, advertise: str, expected: set[tuple[str, str]]) -> None:
    """The output of ``exim -bP`` parsed (the real binary is in tests/exim): a host
    list other than ``*`` / ``!*`` / none is not evaluated here, and said so."""
    monkeypatch.setattr(exim, "run_tool", lambda argv, what: _bp(tls_advertise_hosts=advertise))
    (f,) = exim.discover("/etc/exim4/x.conf")
    got = {(li.endpoint, li.protocol) for s in f.served for li in s.listeners}
    assert got == expected
    assert any("cannot be read" in n for n in f.notes) == (advertise == "!127.0.0.1 : *")


def test_certtool_finds_a_key_that_is_not_the_certificates_and_a_chain_it_cannot_read(tmp_path: Path) -> None:
    """GnuTLS's own verdict on staged files (stage's checks catch a mismatched pair
    first; this is the second library's word, tested on its own)."""
    import shutil

    from tests.support.pki import make_pki

    if not shutil.which("certtool"):
        from tests.support.services import unavailable

        unavailable("certtool (gnutls-bin) is not installed (scripts/bootstrap.sh installs it)")
    pki = make_pki("ec")
    a, b = pki.leaf(), pki.leaf()
    cert, key, other = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "o.pem"
    cert.write_bytes(a.fullchain_pem)
    key.write_bytes(a.key_pem)
    other.write_bytes(b.key_pem)
    assert exim.check_files([(str(cert), str(key))]) is None
    combined = tmp_path / "combined.pem"
    combined.write_bytes(a.key_pem + a.fullchain_pem)
    assert exim.check_files([(str(combined), str(combined))]) is None
    assert "not the staged certificate's" in (exim.check_files([(str(cert), str(other))]) or "")
    broken = tmp_path / "broken.pem"
    pem = a.fullchain_pem
    cut = pem.rindex(b"-----END CERTIFICATE-----")
    broken.write_bytes(pem[:cut - 40] + pem[cut:])  # the intermediate's body cut short
    why = exim.check_files([(str(broken), str(key))]) or ""
    assert "GnuTLS" in why and "PRIVATE" not in why
