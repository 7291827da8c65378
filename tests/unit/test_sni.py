"""SNI, the pure parts: a Postfix table's source and keys, smtpd's lookup order, a
target's ``sni`` settings, and the listeners an SNI target is verified on."""

from __future__ import annotations

from typing import Any

import pytest

from mailtls_tasks.core.config import SNI_UNKNOWN_NAME, parse_config
from mailtls_tasks.core.material import key_chains, pem_blocks
from mailtls_tasks.daemons.postfix_sni import (
    SniEntry,
    format_source,
    key_for_name,
    lookup_keys,
    name_for_key,
    parse_map,
    parse_source,
)
from mailtls_tasks.errors import ConfigError


def test_a_source_with_comments_continuations_and_commas_parses_as_postmap_reads_it() -> None:
    text = ("# the SNI table\n\n"
            "Example.NET /etc/ssl/k.pem, /etc/ssl/c.pem\n"
            ".example.net\t/etc/ssl/k.pem,/etc/ssl/c.pem\n"
            "example.org /etc/ssl/rsa.pem\n"
            "    /etc/ssl/ecdsa.pem\n")
    assert parse_source(text, "sni") == [
        SniEntry("example.net", ("/etc/ssl/k.pem", "/etc/ssl/c.pem")),
        SniEntry(".example.net", ("/etc/ssl/k.pem", "/etc/ssl/c.pem")),
        SniEntry("example.org", ("/etc/ssl/rsa.pem", "/etc/ssl/ecdsa.pem")),
    ]
    again = parse_source(format_source(parse_source(text, "sni")).decode(), "again")
    assert again == parse_source(text, "sni")


@pytest.mark.parametrize(("text", "error"), [
    ("example.net\n", "names no file"),
    ("example.net certs/k.pem\n", "not an absolute path"),
    ("a.example /k.pem\nA.example /k2.pem\n", "listed twice"),
])
def test_a_bad_source_line_is_named(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=rf"sni:\d+: .*{error}"):
        parse_source(text, "sni")


def test_smtpd_looks_up_the_name_then_each_parent_with_a_dot() -> None:
    assert lookup_keys("Mail.Example.NET.") == ["mail.example.net", ".example.net", ".net"]
    assert key_for_name("*.example.net") == ".example.net" and name_for_key(".example.net") == "*.example.net"
    assert key_for_name("example.net") == name_for_key("example.net") == "example.net"


@pytest.mark.parametrize(("spec", "error"), [
    ("/etc/postfix/sni", "not TYPE:/path"),
    ("ldap:/etc/postfix/sni-ldap.cf", "not one a deploy can rebuild"),
    ("lmdb:sni", "absolute"),
    ("lmdb:/etc/postfix/sni.lmdb", "by its source"),
])
def test_a_table_a_deploy_cannot_rebuild_is_refused_by_name(spec: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_map(spec)


def test_the_compiled_file_of_each_table_type() -> None:
    assert parse_map("lmdb:/etc/postfix/sni").compiled == "/etc/postfix/sni.lmdb"
    assert parse_map("hash:/etc/postfix/sni").compiled == "/etc/postfix/sni.db"
    texthash = parse_map("texthash:/etc/postfix/sni")
    assert not texthash.indexed and texthash.compiled == ""


def _target(mode: str = "postfix", **fields: Any) -> dict[str, Any]:
    return {"targets": {"t": {"mode": mode, "cert_path": "/etc/ssl/c.pem", "key_path": "/etc/ssl/k.pem",
                              **fields}}}


@pytest.mark.parametrize(("mode", "fields", "error"), [
    ("postfix", {"sni": {"map": "lmdb:/etc/postfix/sni"}}, "targets.t: sni: names are required"),
    ("postfix", {"names": ["a.example"], "sni": {}}, "name it as main.cf's tls_server_sni_maps does"),
    ("dovecot", {"names": ["a.example"], "sni": {"map": "lmdb:/etc/postfix/sni"}}, "local_name blocks"),
    ("postfix", {"names": ["a.example"], "sni": {"map": "mysql:/etc/postfix/sni.cf"}}, "mysql"),
    ("postfix", {"names": ["a.example"], "sni": {"map": "lmdb:/x", "defualt": True}}, "defualt"),
])
def test_sni_settings_that_cannot_work_are_refused_naming_the_field(mode: str, fields: dict[str, Any],
                                                                    error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(_target(mode, **fields))


VERIFY = {"enabled": True, "endpoints": [{"endpoint": "127.0.0.1:25", "protocol": "smtp"},
                                         {"endpoint": "127.0.0.1:465", "protocol": "smtps"}]}


def test_an_sni_target_is_verified_by_each_name_on_each_listener() -> None:
    cfg = parse_config(_target(names=["a.example", "*.b.example"], sni={"map": "lmdb:/etc/postfix/sni"},
                               post_deploy_verify=VERIFY))
    t = cfg.targets["t"]
    assert [(li.endpoint, li.server_name) for li in t.verify_endpoints()] == [
        ("127.0.0.1:25", "a.example"), ("127.0.0.1:25", "mailtls-probe.b.example"),
        ("127.0.0.1:465", "a.example"), ("127.0.0.1:465", "mailtls-probe.b.example")]
    # its deploy must leave the default certificate (no SNI) as it was
    assert [(li.endpoint, li.server_name) for li in t.default_listeners()] == [("127.0.0.1:25", None),
                                                                               ("127.0.0.1:465", None)]
    assert t.verify_endpoints()[1].where == "127.0.0.1:25 (SNI mailtls-probe.b.example)"


def test_the_default_target_is_verified_without_sni_and_with_an_unknown_name_too() -> None:
    cfg = parse_config(_target(names=["mx.example"], sni={"map": "lmdb:/etc/postfix/sni", "default": True},
                               post_deploy_verify=VERIFY))
    t = cfg.targets["t"]
    assert [li.server_name for li in t.verify_endpoints()][:3] == ["mx.example", None, SNI_UNKNOWN_NAME]
    assert t.default_listeners() == []


def test_key_first_material_splits_per_key() -> None:
    key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    cert = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
    assert key_chains(key + cert + cert + b"\n" + key + cert) == [key + cert + cert, key + cert]
    # a file and a table's value hold the same blocks however they are joined
    assert pem_blocks(key + b"\n" + cert) == pem_blocks(key + cert)
