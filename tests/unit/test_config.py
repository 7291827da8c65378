from __future__ import annotations

import json
import os

import pytest

from mailtls_tasks import daemons
from mailtls_tasks.commands import SHELL_METACHARACTERS
from mailtls_tasks.core.config import load_config, parse_config
from mailtls_tasks.errors import ConfigError, UnknownTarget


def cfg(**target: object) -> dict[str, object]:
    return {"host": "mx1", "state_dir": "/var/lib/mailtls", "targets": {"t": target}}


def test_unset_mode_is_postfix_with_contract_defaults() -> None:
    t = parse_config(cfg()).target("t")
    assert t.mode == "postfix"
    assert t.cert_path == "/etc/postfix/certs/cert.pem"
    assert t.key_path == "/etc/postfix/certs/key.pem"
    assert t.chain_path == ""
    assert t.reload_command == "postfix reload"
    assert t.validate_command == "postfix check"
    assert t.post_deploy_verify.enabled is False


def test_dovecot_defaults() -> None:
    t = parse_config(cfg(mode="dovecot")).target("t")
    for k, v in daemons.get("dovecot").defaults.items():
        assert getattr(t, k) == v
    assert t.reload_command == "doveadm reload" and t.validate_command == "doveconf -n"


@pytest.mark.parametrize("ch", sorted(SHELL_METACHARACTERS))
def test_each_shell_metacharacter_rejected_naming_target_and_field(ch: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(cfg(reload_command=f"postfix reload {ch} rm -rf /"))
    assert "targets.t.reload_command" in str(err.value)
    assert "metacharacter" in str(err.value)


def test_metacharacter_in_validate_command_rejected() -> None:
    with pytest.raises(ConfigError, match=r"targets\.t\.validate_command"):
        parse_config(cfg(validate_command="postfix check && true"))


@pytest.mark.parametrize("field", ["cert_path", "key_path", "chain_path"])
def test_relative_path_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"targets\.t\.{field}.*not an absolute path"):
        parse_config(cfg(**{field: "certs/x.pem"}))


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ConfigError, match=r"targets\.t.*unknown mode 'sendmail'"):
        parse_config(cfg(mode="sendmail"))


def test_unknown_field_rejected() -> None:
    with pytest.raises(ConfigError, match=r"targets\.t\.reload_cmd"):
        parse_config(cfg(reload_cmd="x"))


def test_target_names_with_path_characters_rejected() -> None:
    with pytest.raises(ConfigError, match="not a valid target name"):
        parse_config({"targets": {"../etc": {}}})


def test_verify_timeout_as_string_and_protocol() -> None:
    t = parse_config(cfg(post_deploy_verify={"enabled": True, "endpoint": "mail.example:587",
                                             "timeout": "30s", "protocol": "auto"})).target("t")
    v = t.post_deploy_verify
    (li,) = t.verify_endpoints()
    assert v.timeout == 30.0 and (li.host, li.port, li.timeout) == ("mail.example", 587, 30.0)
    assert parse_config(cfg(post_deploy_verify={"timeout": "500ms"})).target("t").post_deploy_verify.timeout == 0.5


def test_verify_enabled_needs_endpoint() -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        parse_config(cfg(post_deploy_verify={"enabled": True}))
    with pytest.raises(ConfigError, match="protocol"):
        parse_config(cfg(post_deploy_verify={"protocol": "gopher"}))


def test_same_file_twice_rejected() -> None:
    with pytest.raises(ConfigError, match="different files"):
        parse_config(cfg(cert_path="/a/x.pem", key_path="/a/x.pem"))


def test_unknown_target_is_rejected_error() -> None:
    with pytest.raises(UnknownTarget, match="unknown target 'nope'"):
        parse_config(cfg()).target("nope")
    assert UnknownTarget.exit_code == 2


def test_load_toml_and_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "t.toml"
    toml.write_text(f'host = "mx9"\nstate_dir = "{tmp_path}/s"\n[targets.smtp]\nmode = "postfix"\n'
                    '[targets.imap]\nmode = "dovecot"\npost_deploy_verify = { enabled = true, '
                    'endpoint = "127.0.0.1:993" }\n')
    c = load_config(str(toml))
    assert c.host == "mx9" and set(c.targets) == {"smtp", "imap"}
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"targets": {"a": {"mode": "dovecot"}}}))
    assert load_config(str(js)).target("a").mode == "dovecot"
    bad = tmp_path / "bad.toml"
    bad.write_text("targets = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.toml"))


def test_config_path_from_env(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"host": "fromenv"}))
    monkeypatch.setenv("MAILTLS_CONFIG", str(js))
    assert load_config().host == "fromenv"


def test_shipped_example_targets_file_loads() -> None:
    from pathlib import Path

    c = load_config(str(Path(__file__).resolve().parents[2] / "workers" / "targets.example.toml"))
    assert c.host == "mx1"
    assert c.target("imap").mode == "dovecot" and c.target("smtp").post_deploy_verify.enabled


def test_compose_targets_file_loads_and_core_does_not_import_celery() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert set(load_config(str(root / "compose" / "targets.toml")).targets) == {"smtp", "imap"}
    code = "import sys, mailtls_tasks, mailtls_tasks.core.local; print('celery' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"
    assert callable(__import__("mailtls_tasks").deploy)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "missing-through-dir-link"])
def test_two_roles_that_are_one_file_are_refused(tmp_path: object, how: str) -> None:
    """One stat per path decides it (the check runs for every target of a big targets
    file at every deploy): a symlink, a hard link, or, for files not there yet, a
    directory symlink that makes two paths one."""
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "real").mkdir()
    if how == "missing-through-dir-link":
        (d / "alias").symlink_to("real")
        cert, key = d / "real" / "x.pem", d / "alias" / "x.pem"
    else:
        cert = d / "real" / "cert.pem"
        cert.write_text("c")
        key = d / "real" / "key.pem"
        if how == "symlink":
            key.symlink_to(cert)
        else:
            os.link(cert, key)
    with pytest.raises(ConfigError) as err:
        parse_config(cfg(cert_path=str(cert), key_path=str(key)))
    assert "are the same file (through a symlink or a hard link)" in str(err.value)
    assert parse_config(cfg(cert_path=str(cert), key_path=str(d / "real" / "other.pem"))).target("t")
