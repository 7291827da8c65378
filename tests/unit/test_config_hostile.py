"""Hostile or mistaken values are refused when the targets file is loaded, naming the
field -- never discovered half-way through a deploy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailtls_tasks.core.config import load_config, parse_config
from mailtls_tasks.errors import ConfigError


def cfg(tmp: Path, **target: object) -> dict[str, object]:
    base: dict[str, object] = {"cert_path": str(tmp / "c.pem"), "key_path": str(tmp / "k.pem"),
                               "reload_command": "/bin/true"}
    base.update(target)
    return {"host": "mx1", "state_dir": str(tmp / "state"), "targets": {"t": base}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "inf", "nan", -1, 0])
@pytest.mark.parametrize("field", ["command_timeout", "verify_timeout", "deploy_lease"])
def test_non_finite_or_non_positive_durations(tmp_path: Path, field: str, value: object) -> None:
    c = cfg(tmp_path)
    if field == "verify_timeout":
        c["targets"]["t"]["post_deploy_verify"] = {"enabled": True, "endpoint": "127.0.0.1:25",  # type: ignore[index]
                                                   "timeout": value}
    elif field == "deploy_lease":
        c["deploy_lease"] = value
    else:
        c["targets"]["t"][field] = value  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"timeout|deploy_lease|duration|positive"):
        parse_config(c)


@pytest.mark.parametrize("name", ["mail example.com", "-bad.example", "a..b", "mx1.example.com/x", "127.0.0.1",
                                  "x" * 64 + ".example", "ü.example", "*.example.com"])
def test_invalid_server_name(tmp_path: Path, name: str) -> None:
    c = cfg(tmp_path, post_deploy_verify={"enabled": True, "endpoint": "127.0.0.1:25", "server_name": name})
    with pytest.raises(ConfigError, match="server_name"):
        parse_config(c)


def test_valid_server_name_normalized(tmp_path: Path) -> None:
    c = cfg(tmp_path, post_deploy_verify={"enabled": True, "endpoint": "127.0.0.1:25",
                                          "server_name": "Mail.Example.COM."})
    assert parse_config(c).target("t").post_deploy_verify.server_name == "mail.example.com"


@pytest.mark.parametrize("field", ["owner", "group"])
def test_unknown_owner_or_group(tmp_path: Path, field: str) -> None:
    with pytest.raises(ConfigError, match=f"targets.t.{field}: no (user|group) 'no-such-mailtls-x'"):
        parse_config(cfg(tmp_path, **{field: "no-such-mailtls-x"}))
    assert parse_config(cfg(tmp_path, **{field: "root"})).target("t")


def test_timeouts_must_fit_inside_a_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not fit inside a step's time limit"):
        parse_config(cfg(tmp_path, command_timeout=300))
    with pytest.raises(ConfigError, match="does not fit"):
        parse_config(cfg(tmp_path, command_timeout=200, post_deploy_verify={
            "enabled": True, "endpoint": "127.0.0.1:25", "timeout": "2m"}))
    assert parse_config(cfg(tmp_path, command_timeout=200))


def test_two_targets_sharing_a_file_in_different_roles(tmp_path: Path) -> None:
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "cert.pem").symlink_to(tmp_path / "k.pem")
    c = cfg(tmp_path)
    c["targets"]["u"] = {"cert_path": str(tmp_path / "links" / "cert.pem"),  # type: ignore[index]
                         "key_path": str(tmp_path / "other-key.pem"), "reload_command": "/bin/true"}
    with pytest.raises(ConfigError, match=r"targets.u.cert_path: .* same file .* as targets.t.key_path"):
        parse_config(c)


def test_sharing_a_file_in_the_same_role_is_fine(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    c["targets"]["u"] = dict(c["targets"]["t"])  # type: ignore[index]
    assert set(parse_config(c).targets) == {"t", "u"}


def test_cert_and_key_resolving_to_one_file(tmp_path: Path) -> None:
    (tmp_path / "alias.pem").symlink_to(tmp_path / "c.pem")
    with pytest.raises(ConfigError, match=r"are the same file \(through a symlink"):
        parse_config(cfg(tmp_path, key_path=str(tmp_path / "alias.pem")))


def test_symlink_planted_in_a_directory_a_user_can_write(tmp_path: Path) -> None:
    """The renewal user owns its directory and plants cert.pem -> /etc/shadow."""
    drop = tmp_path / "renewal-user"
    drop.mkdir()
    os.chown(drop, 4242, 4242)
    (drop / "cert.pem").symlink_to("/etc/shadow")
    os.lchown(drop / "cert.pem", 4242, 4242)
    with pytest.raises(ConfigError, match=r"cert_path: .* is not safe to write as root: .* owned by uid 4242"):
        parse_config(cfg(tmp_path, cert_path=str(drop / "cert.pem")))


def test_group_or_world_writable_directory_on_the_way(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    with pytest.raises(ConfigError, match="writable by its group"):
        parse_config(cfg(tmp_path, key_path=str(shared / "k.pem")))
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        parse_config(cfg(tmp_path, key_path=str(shared / "k.pem")))
    os.chmod(shared, 0o1777)  # sticky, like /tmp: safe only for an existing root-owned entry
    with pytest.raises(ConfigError, match="does not exist yet"):
        parse_config(cfg(tmp_path, key_path=str(shared / "k.pem")))
    (shared / "k.pem").write_bytes(b"")
    assert parse_config(cfg(tmp_path, key_path=str(shared / "k.pem")))


def test_targets_file_others_can_write_is_refused(tmp_path: Path) -> None:
    import json

    path = tmp_path / "targets.json"
    path.write_text(json.dumps(cfg(tmp_path)))
    assert load_config(str(path))
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="refusing a targets file others could change"):
        load_config(str(path))
