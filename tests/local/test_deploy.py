"""In-process deploys against real files, real executables and real TLS listeners."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.journal import Journal
from tests.support.commands import FakeCommand
from tests.support.host import MailHost
from tests.support.pki import PKI

UTC = dt.UTC


def served(endpoint: str, protocol: str = "tls") -> str:
    host, port = endpoint.rsplit(":", 1)
    return probe.probe(host, int(port), protocol).fingerprint


def assert_untouched(host: MailHost, before: dict[str, tuple[bytes, int, int]]) -> None:
    assert host.snapshot() == before  # bytes, mode and mtime
    assert host.stray_temps() == []


def test_postfix_happy_path_verified_on_smtp_starttls(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    srv = host.server("mx", "smtp")
    host.enable_verify("mx", srv.endpoint, protocol="smtp")
    assert served(srv.endpoint, "smtp") == old.fingerprint

    r = host.deploy("mx", new)

    assert r.outcome == "deployed", r.error
    assert r.fingerprint_sha256 == new.fingerprint
    assert r.previous_fingerprint_sha256 == old.fingerprint
    assert r.served_fingerprint_sha256 == new.fingerprint == served(srv.endpoint, "smtp")
    assert host.path("mx", "cert").read_bytes() == new.cert_pem + pki.inter.cert_pem
    assert host.path("mx", "key").read_bytes() == new.key_pem
    assert len(host.validate.calls) == 1 and len(host.reload.calls) == 1
    assert list(r.steps) == ["stage", "validate", "commit", "reload", "verify"]
    assert all(s.status == "ok" for s in r.steps.values())
    assert host.stray_temps() == []


def test_dovecot_happy_path_uses_mode_default_commands(host: MailHost, pki: PKI, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    doveadm, doveconf = FakeCommand(host.bin, "doveadm"), FakeCommand(host.bin, "doveconf")
    doveadm.touches(host.trigger)
    monkeypatch.setenv("PATH", f"{host.bin}:{os.environ['PATH']}")
    old, new = pki.leaf(), pki.leaf()
    host.add_target("imap", mode="dovecot")
    del host.targets["imap"]["reload_command"], host.targets["imap"]["validate_command"]
    host.write_config()
    assert host.config.target("imap").reload_command == "doveadm reload"
    host.install("imap", old)
    srv = host.server("imap", "imap")
    host.enable_verify("imap", srv.endpoint, protocol="imap")

    r = host.deploy("imap", new)

    assert r.outcome == "deployed", r.error
    assert doveadm.calls == ["reload"] and doveconf.calls == ["-n"]
    assert served(srv.endpoint, "imap") == new.fingerprint


def test_validate_fails_rejected_untouched_no_reload(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    before = host.snapshot()
    host.validate.fail(1)

    r = host.deploy("mx", new)

    assert r.outcome == "rejected" and r.exit_code == 2
    assert "validate_command failed" in (r.error or "")
    assert_untouched(host, before)
    assert host.reload.calls == []


def test_reload_fails_rolled_back_byte_exact_and_reloaded_again(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx", chain_path=str(host.certs / "mx-chain.pem"))
    host.install("mx", old)
    os.chmod(host.path("mx", "cert"), 0o640)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    host.reload.fail_once(1)

    r = host.deploy("mx", new)

    assert r.outcome == "rolled_back" and r.exit_code == 3
    assert "reload_command failed" in (r.error or "")
    assert {k: v[:2] for k, v in host.snapshot().items()} == before
    assert len(host.reload.calls) == 2  # the failed reload, then the rollback's
    assert host.stray_temps() == []


def test_reload_fails_twice_is_failed_with_what_is_on_disk(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    host.reload.fail(1)
    r = host.deploy("mx", new)
    assert r.outcome == "failed" and r.exit_code == 4
    assert "old files restored but reload failed" in (r.error or "")
    assert old.fingerprint in (r.error or "") and "key matches" in (r.error or "")
    assert host.path("mx", "cert").read_bytes() == old.fullchain_pem  # the old set is what is on disk


def test_verify_mismatch_rolled_back_old_leaf_served(host: MailHost, pki: PKI, tmp_path: Path) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    # the daemon is (mis)configured to read other files: it keeps serving the old leaf
    (tmp_path / "elsewhere").mkdir()
    other_cert, other_key = tmp_path / "elsewhere/c.pem", tmp_path / "elsewhere/k.pem"
    other_cert.write_bytes(old.fullchain_pem)
    other_key.write_bytes(old.key_pem)
    from tests.support.tlsserver import TLSServer

    srv = TLSServer(other_cert, other_key, "pop3", trigger=host.trigger)
    host.servers.append(srv)
    host.enable_verify("mx", srv.endpoint, timeout=0.6, protocol="pop3")

    r = host.deploy("mx", new)

    assert r.outcome == "rolled_back", r.error
    assert "did not serve" in (r.error or "")
    assert r.served_fingerprint_sha256 == old.fingerprint == served(srv.endpoint, "pop3")
    assert {k: v[:2] for k, v in host.snapshot().items()} == before
    assert r.steps["verify"].status == "failed" and r.steps["rollback"].status == "ok"


def test_redeploy_identical_is_unchanged_and_runs_nothing(host: MailHost, pki: PKI) -> None:
    new = pki.leaf()
    host.add_target("mx")
    assert host.deploy("mx", new).outcome == "deployed"
    host.reload.reset()
    host.validate.reset()
    before = host.snapshot()

    r = host.deploy("mx", new)

    assert r.outcome == "unchanged" and r.exit_code == 0
    assert host.reload.calls == [] and host.validate.calls == []
    assert_untouched(host, before)


def test_redeploy_identical_with_verify_on_and_served_is_unchanged(host: MailHost, pki: PKI) -> None:
    new = pki.leaf()
    host.add_target("mx")
    host.install("mx", new)
    srv = host.server("mx", "imap")
    host.enable_verify("mx", srv.endpoint, protocol="imap")
    r = host.deploy("mx", new)
    assert r.outcome == "unchanged"
    assert r.served_fingerprint_sha256 == new.fingerprint
    assert host.reload.calls == []


def test_identical_bytes_but_other_leaf_served_reloads(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    srv = host.server("mx", "smtp")
    host.install("mx", new)  # copied by hand; the daemon was never reloaded
    host.enable_verify("mx", srv.endpoint, protocol="smtp")
    assert served(srv.endpoint, "smtp") == old.fingerprint

    r = host.deploy("mx", new)

    assert r.outcome == "deployed", r.error
    assert r.steps["commit"].status == "skipped"
    assert len(host.reload.calls) == 1
    assert served(srv.endpoint, "smtp") == new.fingerprint


def test_identical_bytes_other_leaf_served_and_reload_fails_is_failed(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    srv = host.server("mx", "tls")
    host.install("mx", new)
    host.enable_verify("mx", srv.endpoint, timeout=0.5)
    host.reload.fail()

    r = host.deploy("mx", new)

    assert r.outcome == "failed" and r.exit_code == 4
    assert "no older set" in (r.error or "") and "on disk:" in (r.error or "") and "served on " in (r.error or "")


def test_two_targets_sharing_one_cert_file_both_serve_it(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    shared_cert, shared_key = host.certs / "shared-cert.pem", host.certs / "shared-key.pem"
    host.add_target("smtp", cert_path=str(shared_cert), key_path=str(shared_key))
    # a second daemon with its own reload trigger, same files
    trig2 = host.root / "trigger2"
    reload2 = FakeCommand(host.bin, "reload2")
    reload2.touches(trig2)
    host.add_target("imap", mode="dovecot", cert_path=str(shared_cert), key_path=str(shared_key),
                    reload_command=str(reload2.path))
    host.install("smtp", old)
    from tests.support.tlsserver import TLSServer

    s1 = host.server("smtp", "smtp")
    s2 = TLSServer(shared_cert, shared_key, "imap", trigger=trig2)
    host.servers.append(s2)
    host.enable_verify("smtp", s1.endpoint, protocol="smtp")
    host.enable_verify("imap", s2.endpoint, protocol="imap")

    assert host.deploy("smtp", new).outcome == "deployed"
    r2 = host.deploy("imap", new)

    assert r2.outcome == "deployed", r2.error
    assert served(s1.endpoint, "smtp") == served(s2.endpoint, "imap") == new.fingerprint
    assert len(reload2.calls) == 1


def test_chain_appended_vs_chain_path_and_modes(host: MailHost, pki: PKI) -> None:
    new = pki.leaf()
    host.add_target("a")
    host.add_target("b", chain_path=str(host.certs / "b-chain.pem"))
    assert host.deploy("a", new).outcome == "deployed"
    assert host.deploy("b", new).outcome == "deployed"
    assert host.path("a", "cert").read_bytes() == new.cert_pem + pki.inter.cert_pem
    assert host.path("b", "cert").read_bytes() == new.cert_pem
    assert host.path("b", "chain").read_bytes() == pki.inter.cert_pem
    for t in ("a", "b"):
        assert stat.S_IMODE(host.path(t, "key").stat().st_mode) == 0o600
        assert stat.S_IMODE(host.path(t, "cert").stat().st_mode) == 0o644
    assert stat.S_IMODE(host.path("b", "chain").stat().st_mode) == 0o644


def test_chain_path_set_but_no_chain_is_rejected(host: MailHost, pki: PKI) -> None:
    host.add_target("b", chain_path=str(host.certs / "b-chain.pem"))
    new = pki.leaf()
    r = host.deploy("b", new, fullchain=False)
    assert r.outcome == "rejected" and "no chain" in (r.error or "")
    assert host.snapshot() == {}


def test_existing_owner_and_mode_preserved(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    os.chown(host.path("mx", "key"), 0, 8)  # group 'mail' on Debian; any non-root gid will do
    os.chmod(host.path("mx", "key"), 0o640)
    os.chown(host.path("mx", "cert"), 65534, 65534)
    os.chmod(host.path("mx", "cert"), 0o604)

    assert host.deploy("mx", new).outcome == "deployed"

    k, c = host.path("mx", "key").stat(), host.path("mx", "cert").stat()
    assert (stat.S_IMODE(k.st_mode), k.st_uid, k.st_gid) == (0o640, 0, 8)
    assert (stat.S_IMODE(c.st_mode), c.st_uid, c.st_gid) == (0o604, 65534, 65534)


@pytest.mark.parametrize(("found", "key_mode", "written"), [(0o644, None, 0o600), (0o660, None, 0o600),
                                                           (0o604, "0640", 0o640), (0o640, None, 0o640)])
def test_a_key_file_readable_by_others_is_written_0600_and_said_so(host: MailHost, pki: PKI, found: int,
                                                                  key_mode: str | None, written: int) -> None:
    """One rule for files that hold a key: never left readable by others (or group-
    writable); kept when it is not; key_mode, when set, wins."""
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx", **({"key_mode": key_mode} if key_mode else {}))
    host.install("mx", old)
    os.chmod(host.path("mx", "key"), found)
    res = host.deploy("mx", new)
    assert res.outcome == "deployed", res.error
    assert stat.S_IMODE(host.path("mx", "key").stat().st_mode) == written
    loosened = found & 0o027 and key_mode is None
    assert bool(res.notes) == bool(loosened), res.notes
    if loosened:
        assert res.notes == [f"{host.path('mx', 'key')} holds a private key and was mode {found:04o} (readable by "
                             "others or writable by its group): written 0600 (set key_mode, e.g. \"0640\" with a "
                             "group, to choose)"]


def test_configured_owner_and_mode_win(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx", key_mode="0640", group="8")
    host.install("mx", old)
    assert host.deploy("mx", new).outcome == "deployed"
    k = host.path("mx", "key").stat()
    assert (stat.S_IMODE(k.st_mode), k.st_gid) == (0o640, 8)


def test_symlinked_cert_path_link_survives(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    real_dir = host.certs / "archive"
    real_dir.mkdir()
    (real_dir / "cert1.pem").write_bytes(old.fullchain_pem)
    link = host.certs / "live-cert.pem"
    link.symlink_to(real_dir / "cert1.pem")
    host.add_target("mx", cert_path=str(link))
    (host.path("mx", "key")).write_bytes(old.key_pem)

    assert host.deploy("mx", new).outcome == "deployed"

    assert link.is_symlink() and os.readlink(link) == str(real_dir / "cert1.pem")
    assert (real_dir / "cert1.pem").read_bytes() == new.fullchain_pem


@pytest.mark.parametrize("case", ["mismatch", "expired", "out_of_order", "older", "garbage"])
def test_bad_material_rejected_untouched(host: MailHost, pki: PKI, case: str) -> None:
    now = dt.datetime.now(UTC)
    current = pki.leaf(not_before=now - dt.timedelta(hours=1))
    host.add_target("mx")
    host.install("mx", current)
    before = host.snapshot()
    new = pki.leaf()
    cert, key, chain = new.cert_pem, new.key_pem, new.chain_pem
    if case == "mismatch":
        key = pki.leaf().key_pem
    elif case == "expired":
        e = pki.leaf(not_before=now - dt.timedelta(days=60), not_after=now - dt.timedelta(days=1))
        cert, key = e.cert_pem, e.key_pem
    elif case == "out_of_order":
        chain = pki.root.cert_pem + pki.inter.cert_pem
    elif case == "older":
        o = pki.leaf(not_before=now - dt.timedelta(days=3))
        cert, key = o.cert_pem, o.key_pem
    elif case == "garbage":
        cert = cert + b"\x00garbage"
    from mailtls_tasks.core.local import run_local

    r = run_local(host.config, "mx", cert, key, chain)

    assert r.outcome == "rejected" and r.exit_code == 2, r
    assert r.error
    assert_untouched(host, before)
    assert host.reload.calls == [] and host.validate.calls == []


def test_older_leaf_allowed_with_force(host: MailHost, pki: PKI) -> None:
    now = dt.datetime.now(UTC)
    current = pki.leaf(not_before=now - dt.timedelta(hours=1))
    older = pki.leaf(not_before=now - dt.timedelta(days=3))
    host.add_target("mx")
    host.install("mx", current)
    assert host.deploy("mx", older).outcome == "rejected"
    assert host.deploy("mx", older, force=True).outcome == "deployed"


def test_same_deploy_id_twice_converges(host: MailHost, pki: PKI) -> None:
    new = pki.leaf()
    host.add_target("mx")
    r1 = host.deploy("mx", new, deploy_id="fixed-1")
    r2 = host.deploy("mx", new, deploy_id="fixed-1")
    assert r1 == r2 and r1.outcome == "deployed"
    assert len(host.reload.calls) == 1


def test_backups_kept_for_last_five_deploys(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    for _ in range(8):
        assert host.deploy("mx", pki.leaf()).outcome == "deployed"
    journal = Journal(str(host.state))
    assert len(journal.records("mx")) == 5
    key_backups = list(host.state.rglob("backup/key"))
    assert key_backups and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_backups)
    # state_dir and every directory under it 0700 from the start, whatever the umask
    # (os.makedirs would have left the intermediate ones 0755)
    dirs = [host.state, *(p for p in host.state.rglob("*") if p.is_dir())]
    assert len(dirs) > 4 and {oct(stat.S_IMODE(d.stat().st_mode)) for d in dirs} == {"0o700"}


def test_cli_local_json_and_exit_codes(host: MailHost, pki: PKI) -> None:
    new, other = pki.leaf(), pki.leaf()
    host.add_target("mx")
    files = {"c.pem": new.fullchain_pem, "k.pem": new.key_pem, "bad.pem": other.key_pem}
    p = host.cli("deploy", "mx", "--cert", "c.pem", "--key", "k.pem", "--local", "--json", input_files=files)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) >= {"deploy_id", "target", "outcome", "fingerprint_sha256", "previous_fingerprint_sha256",
                        "served_fingerprint_sha256", "steps", "error"}
    assert out["outcome"] == "deployed" and out["fingerprint_sha256"] == new.fingerprint
    assert out["steps"]["reload"]["status"] == "ok" and isinstance(out["steps"]["reload"]["ms"], int)

    p = host.cli("deploy", "mx", "--cert", "c.pem", "--key", "k.pem", "--local", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["outcome"] == "unchanged"

    p = host.cli("deploy", "mx", "--cert", "c.pem", "--key", "bad.pem", "--local", "--json")
    assert p.returncode == 2 and "does not match" in json.loads(p.stdout)["error"]
    assert "PRIVATE" not in p.stdout + p.stderr

    p = host.cli("deploy", "nope", "--cert", "c.pem", "--key", "k.pem", "--local", "--json")
    assert p.returncode == 2 and json.loads(p.stdout)["outcome"] == "rejected"

    host.reload.fail_once()
    n2 = pki.leaf()
    p = host.cli("deploy", "mx", "--cert", "c2.pem", "--key", "k2.pem", "--local",
                 input_files={"c2.pem": n2.fullchain_pem, "k2.pem": n2.key_pem})
    assert p.returncode == 3 and "ROLLED_BACK" in p.stdout

    p = host.cli("deploy", "mx", "--cert", "c.pem")  # usage error: missing --key
    assert p.returncode == 1


def test_cli_check_config(host: MailHost) -> None:
    host.add_target("mx")
    host.targets["imap"] = {"mode": "dovecot"}
    host.write_config()
    p = host.cli("check-config", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["targets"]["imap"]["reload_command"] == "doveadm reload"
    assert data["targets"]["imap"]["cert_path"] == "/etc/dovecot/certs/cert.pem"
    host.targets["bad"] = {"reload_command": "postfix reload; id"}
    host.write_config()
    p = host.cli("check-config")
    assert p.returncode == 1 and "targets.bad.reload_command" in p.stderr


def test_check_config_names_a_missing_directory_and_a_misspelt_field(host: MailHost, pki: PKI) -> None:
    """A target whose directory does not exist passed: a --local deploy would create it,
    the sandboxed unit cannot. And a misspelt field named with the one meant."""
    gone = host.root / "no-such-dir"
    host.add_target("mx", cert_path=str(gone / "cert.pem"), key_path=str(gone / "key.pem"))
    p = host.cli("check-config", "--json")
    assert p.returncode == 0, p.stderr  # a warning: the worker's other targets must not stop for it
    warnings = json.loads(p.stdout)["warnings"]
    assert any(f"targets.mx: the directory of its key file {gone}/key.pem does not exist" in w
               and "sandboxed worker unit cannot" in w for w in warnings), warnings
    assert host.cli("check-config", "--strict").returncode == 1
    gone.mkdir()
    assert not any("does not exist" in w for w in json.loads(host.cli("check-config", "--json").stdout)["warnings"])

    host.targets["mx"]["kye_mode"] = "0640"
    host.write_config()
    p = host.cli("check-config")
    assert p.returncode == 1
    assert "targets.mx.kye_mode: unknown field 'kye_mode'; did you mean 'key_mode'?" in p.stderr, p.stderr
    assert "Extra inputs" not in p.stderr


def test_auto_protocol_on_odd_port_explains_itself(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    host.install("mx", pki.leaf())
    srv = host.server("mx", "smtp")
    with pytest.raises(probe.ProbeError, match=r"set post_deploy_verify\.protocol"):
        probe.probe("127.0.0.1", srv.port, "auto")
