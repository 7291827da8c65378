"""The daemons room: what each daemon declares, and the core asking it instead of
keeping tables keyed by mode."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailtls_tasks import daemons
from mailtls_tasks.core import probe
from mailtls_tasks.core.config import parse_config
from mailtls_tasks.errors import ConfigError

CONTRACT_FIELDS = {"cert_path", "key_path", "chain_path", "reload_command", "validate_command"}


def test_every_daemon_gives_the_contract_defaults_and_its_listeners() -> None:
    assert daemons.MODES == ("postfix", "dovecot", "exim") and daemons.DEFAULT_MODE == "postfix"
    for mode in daemons.MODES:
        d = daemons.get(mode)
        # Exim adds its pid file (its reload is a SIGHUP to the pid it holds)
        assert d.name == mode and set(d.defaults) == CONTRACT_FIELDS | ({"pid_file"} if d.reload_by_signal else set())
        assert d.listeners and d.layouts == daemons.ALL_LAYOUTS
        with pytest.raises(TypeError):
            d.defaults["reload_command"] = "rm"  # type: ignore[index]  # read-only: shared by every target
    assert daemons.get("dovecot").defaults["reload_command"] == "doveadm reload"
    assert [li.port for li in daemons.get("postfix").listeners] == [25, 465, 587]


def test_auto_protocols_come_from_the_daemons_listeners() -> None:
    assert probe.PORT_PROTOCOLS == {25: "smtp", 587: "smtp", 465: "smtps", 143: "imap", 993: "imaps", 110: "pop3",
                                    995: "pop3s"}
    assert probe.resolve_protocol("auto", 587) == "smtp" and probe.resolve_protocol("auto", 4650) == "tls"


def test_two_daemons_disagreeing_on_a_port_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = dataclasses.replace(daemons.get("dovecot"), name="odd",
                              listeners=(daemons.UsualListener(25, "imaps", "smtp?"),))
    monkeypatch.setattr(daemons, "_ALL", (*daemons._ALL, odd))
    with pytest.raises(AssertionError, match="port 25"):
        daemons.port_protocols()


def test_an_unknown_mode_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown mode 'sendmail' \(expected 'postfix', 'dovecot' or 'exim'\)"):
        daemons.get("sendmail")


def test_a_layout_the_daemon_cannot_read_is_refused_by_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config asks the target's daemon which layouts it takes (both of today's take
    all three, so a daemon that takes fewer is made here)."""
    strict = dataclasses.replace(daemons.get("postfix"), name="strict", layouts=frozenset({"separate"}))
    monkeypatch.setitem(daemons.DAEMONS, "strict", strict)
    body = {"mode": "strict", "cert_path": "/etc/s/c.pem", "key_path": "/etc/s/k.pem"}
    assert parse_config({"host": "mx1", "targets": {"t": body}}).target("t").daemon is strict
    with pytest.raises(ConfigError, match=r"targets\.t: mode: strict cannot read a combined layout"):
        parse_config({"host": "mx1", "targets": {"t": {"mode": "strict", "combined_path": "/etc/s/all.pem"}}})
    dual = {**body, "key_type": "rsa", "alt": {"cert_path": "/etc/s/ec.pem", "key_path": "/etc/s/ec.key"}}
    with pytest.raises(ConfigError, match="cannot read a dual layout"):
        parse_config({"host": "mx1", "targets": {"t": dual}})


def test_check_config_hints_come_from_the_daemon(tmp_path: Path) -> None:
    """`check-config` names the listeners a mode usually has that verify leaves out."""
    cfg = tmp_path / "targets.json"
    cfg.write_text(json.dumps({"host": "mx1", "state_dir": str(tmp_path / "state"), "targets": {
        "imap": {"mode": "dovecot", "cert_path": str(tmp_path / "c.pem"), "key_path": str(tmp_path / "k.pem"),
                 "post_deploy_verify": {"enabled": True, "endpoint": "127.0.0.1:993"}}}}))
    cfg.chmod(0o600)
    out = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "check-config", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["targets"]["imap"]["suggested_endpoints"] == [
        "127.0.0.1:143 (imap)", "127.0.0.1:110 (pop3)", "127.0.0.1:995 (pop3s)"]


# doveconf's output as 2.3 and 2.4 print it (from Debian 12's 2.3.19 and 13's 2.4.1)
DOVECONF_23 = """\
# 2.3.19.1 (9b53102964): /etc/dovecot/dovecot.conf
ssl_cert = </etc/dovecot/private/dovecot.pem
ssl_key = </etc/dovecot/private/dovecot.key
service imap-login {
  inet_listener imaps {
    port = 993
    ssl = yes
  }
}
local_name mail.example.org {
  ssl_cert = </etc/ssl/mail.pem
}
"""
DOVECONF_24 = """\
# 2.4.1-4 (7d8c0e5759): /etc/dovecot/dovecot.conf
dovecot_config_version = 2.4.0
protocols {
  imap = yes
  pop3 = yes
}
ssl_server {
  cert_file = /etc/dovecot/private/dovecot.pem
  key_file = /etc/dovecot/private/dovecot.key
}
local_name mail.example.org {
  ssl_server {
    cert_file = /etc/ssl/mail.pem
  }
}
service imap-login {
  inet_listener imap {
  }
}
"""


def test_doveconf_23_and_24_flatten_to_the_same_paths() -> None:
    from mailtls_tasks.daemons.dovecot import _version, flatten

    v23, _ = flatten(DOVECONF_23)
    v24, b24 = flatten(DOVECONF_24)
    assert v23["ssl_cert"] == "</etc/dovecot/private/dovecot.pem"
    assert v23["service/imap-login/inet_listener/imaps/port"] == "993"
    assert v23["local_name/mail.example.org/ssl_cert"] == "</etc/ssl/mail.pem"
    assert v24["ssl_server/cert_file"] == "/etc/dovecot/private/dovecot.pem"
    assert v24["local_name/mail.example.org/ssl_server/cert_file"] == "/etc/ssl/mail.pem"
    assert v24["protocols/imap"] == "yes"
    assert "service/imap-login/inet_listener/imap" in b24  # an empty block is a listener with defaults
    # a path query on 2.3 answers in flat lines, on 2.4 in blocks: the same keys either way
    flat, _ = flatten("service/imap-login/inet_listener/imap/port = 143\n")
    nested, _ = flatten("service imap-login {\n  inet_listener imap {\n    port = 143\n  }\n}\n")
    assert flat == nested == {"service/imap-login/inet_listener/imap/port": "143"}
    assert _version(DOVECONF_23.splitlines()[0]) == ("2.3.19.1", (2, 3, 19, 1), "/etc/dovecot/dovecot.conf")
    assert _version(DOVECONF_24.splitlines()[0]) == ("2.4.1-4", (2, 4, 1), "/etc/dovecot/dovecot.conf")


def test_a_pair_of_certificates_no_target_can_take_is_noted_not_proposed() -> None:
    """Both daemons' dual sets meet one check: one RSA and one ECDSA, or no target (a
    Dovecot alt pair whose files could not be read was proposed with invented types)."""
    from mailtls_tasks.core.discover import propose, render
    from mailtls_tasks.daemons.found import FileSet, FileSlot, Found, FoundListener, Served

    li = FoundListener("127.0.0.1", 993, "imaps", "imap-login imaps")
    unknown = FileSet((FileSlot(cert="/c1", key="/k1"), FileSlot(cert="/c2", key="/k2")))
    dual = FileSet((FileSlot(cert="/r", key="/rk", key_type="rsa"), FileSlot(cert="/e", key="/ek", key_type="ecdsa")))
    found = [Found("dovecot", "/d.conf", False, "2.4.1", served=[Served(unknown, [li], "/d.conf")]),
             Found("postfix", "/pf", False, "3.10", served=[Served(dual, [li], "main.cf")])]
    targets = propose(found)
    assert list(targets) == ["postfix-pf"]
    assert targets["postfix-pf"]["key_type"] == "rsa" and targets["postfix-pf"]["alt"]["key_type"] == "ecdsa"
    assert "not one RSA and one ECDSA as far as their files tell (any, any): not proposed" in render(found, "mx")
