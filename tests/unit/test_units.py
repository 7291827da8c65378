"""The systemd units in workers/: systemd itself accepts every line, and the sandbox,
ordering and secret handling the README promises are really in them."""

from __future__ import annotations

import stat
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from tests.support.services import REPO, require

WORKERS = REPO / "workers"
UNITS = sorted(p.name for p in [*WORKERS.glob("*.service"), *WORKERS.glob("*.timer")])
SERVICES = [u for u in UNITS if u.endswith(".service")]
MAILTLS = "/usr/local/bin/mailtls"
EXEC_KEYS = ("ExecCondition", "ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop",
             "ExecStopPost")
SECRETS = ("--basic-auth", "redis://", "rediss://", "--broker", "password", "BASIC_AUTH")
ROOT_UNITS = ("mailtls-worker.service", "mailtls-recover.service", "mailtls-audit.service")

Unit = dict[str, dict[str, list[str]]]


def parse(name: str) -> Unit:
    """section -> key -> every value assigned, in order (continuation lines joined)."""
    out: Unit = {}
    section = ""
    pending = ""
    for raw in (WORKERS / name).read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every word assigned to a list setting (ReadWritePaths=, Before=...)."""
    return [w for v in unit.get(section, {}).get(key, []) for w in v.split()]


def one(unit: Unit, section: str, key: str) -> str:
    vals = unit.get(section, {}).get(key, [])
    assert vals, f"{key}= missing in [{section}]"
    return vals[-1]


def exec_lines(unit: Unit) -> list[str]:
    return [v for k in EXEC_KEYS for v in unit.get("Service", {}).get(k, [])]


def header(name: str) -> str:
    lines = (WORKERS / name).read_text().splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def test_the_units_are_there() -> None:
    assert {"mailtls-worker.service", "mailtls-recover.service", "mailtls-audit.service", "mailtls-audit.timer",
            "mailtls-flower.service"} <= set(UNITS)


# --------------------------------------------------------------------------- systemd-analyze verify

def _systemd_analyze() -> str:
    return require("systemd-analyze")  # bootstrap installs systemd; under CI=true missing fails, never skips


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` against a throwaway root holding the units, byte for byte,
    and an executable at /usr/local/bin/mailtls (verify refuses an Exec path that is not
    there). `--recursive-errors=no` checks only the named unit (not the host's postfix
    units) and turns every warning about it -- an unknown key, a value that does not
    parse -- into a non-zero exit."""
    return subprocess.run([_systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", f"--root={root}", unit],
                          capture_output=True, text=True, timeout=60, check=False)


def _root(tmp_path: Path, edit: tuple[str, str, str] | None = None) -> Path:
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in UNITS:
        text = (WORKERS / name).read_text()
        if edit and edit[0] == name:
            assert edit[1] in text
            text = text.replace(edit[1], edit[2])
        (units / name).write_text(text)
    exe = root / MAILTLS.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_accepts_every_line(tmp_path: Path, unit: str) -> None:
    res = _verify(_root(tmp_path), unit)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0, out
    ours = [line for line in out.splitlines() if any(u in line for u in UNITS)]
    assert not ours, out


@pytest.mark.parametrize(("old", "new"), [
    ("ProtectSystem=strict", "ProtectSytem=strict"),                 # a key systemd does not know: ignored
    ("SystemCallFilter=@system-service", "SystemCallFilter=@system-servce"),
    ("ReadWritePaths=-/var/spool/postfix", "ReadWritePaths=var/spool/postfix"),
    ("ExecStart=/usr/local/bin/mailtls", "ExecStart=/usr/local/bin/mailtlz"),
])
def test_verify_catches_a_broken_line(tmp_path: Path, old: str, new: str) -> None:
    """The check above is only worth something if systemd says no to a typo."""
    res = _verify(_root(tmp_path, ("mailtls-worker.service", old, new)), "mailtls-worker.service")
    assert res.returncode != 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- static checks

@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_starts_with_its_install_commands(unit: str) -> None:
    head = header(unit)
    assert head, f"{unit} must start with a comment block"
    assert "install -m 0644 " in head and f"workers/{unit}" in head, head
    assert "/etc/systemd/system/" in head
    assert "systemctl daemon-reload" in head
    assert "systemctl enable --now" in head


@pytest.mark.parametrize("unit", SERVICES)
def test_exec_lines_run_the_installed_mailtls_and_carry_no_secret(unit: str) -> None:
    u = parse(unit)
    lines = exec_lines(u)
    assert lines
    for line in lines:
        argv0 = line.split()[0].lstrip("-@:+!")
        assert argv0 == MAILTLS, line
        for secret in SECRETS:
            assert secret.lower() not in line.lower(), line
    for env in u["Service"].get("Environment", []):
        for secret in SECRETS:
            assert secret.lower() not in env.lower(), env


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_sandboxed(unit: str) -> None:
    u = parse(unit)
    assert one(u, "Service", "ProtectSystem") == "strict"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert one(u, "Service", "PrivateTmp") == "yes"
    assert one(u, "Service", "SystemCallArchitectures") == "native"
    assert one(u, "Service", "UMask") == "0077"
    assert set(values(u, "Service", "RestrictAddressFamilies")) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    for key in ("ProtectKernelTunables", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert one(u, "Service", key) == "yes", key
    if unit in ROOT_UNITS:
        assert one(u, "Service", "StateDirectory") == "mailtls"
        assert one(u, "Service", "StateDirectoryMode") == "0700"
        assert one(u, "Service", "ProtectHome") == "read-only"
        assert "/root/.acme.sh" in (WORKERS / unit).read_text(), "say what ProtectHome=read-only means for acme.sh"


@pytest.mark.parametrize("unit", SERVICES)
def test_read_write_paths_are_optional_and_leave_the_state_dir_to_systemd(unit: str) -> None:
    u = parse(unit)
    state = [f"/var/lib/{d}" for d in values(u, "Service", "StateDirectory")]
    for entry in values(u, "Service", "ReadWritePaths"):
        path = entry.lstrip("-+")
        assert PurePosixPath(path).is_absolute(), entry
        assert path not in state, f"{entry}: StateDirectory= already makes it writable"
        assert entry.startswith("-"), f"{entry}: a missing directory must not stop the unit (prefix it with -)"


def _example_paths() -> tuple[list[str], str]:
    cfg = tomllib.loads((WORKERS / "targets.example.toml").read_text())
    files = [t[k] for t in cfg["targets"].values() for k in ("cert_path", "key_path", "chain_path") if t.get(k)]
    return files, cfg.get("state_dir", "/var/lib/mailtls")


@pytest.mark.parametrize("unit", ["mailtls-worker.service", "mailtls-recover.service"])
def test_the_example_targets_are_writable(unit: str) -> None:
    u = parse(unit)
    writable = [PurePosixPath(e.lstrip("-+")) for e in values(u, "Service", "ReadWritePaths")]
    files, state_dir = _example_paths()
    assert files
    for f in files:
        d = PurePosixPath(f).parent
        assert any(d == w or w in d.parents for w in writable), f"{d} is read-only in {unit}"
    assert state_dir == "/var/lib/" + one(u, "Service", "StateDirectory")
    # what `postfix reload` needs: read-only, it mistakes a stale master.pid for a running master
    assert PurePosixPath("/var/spool/postfix") in writable


def test_worker_and_recovery_share_one_sandbox() -> None:
    w, r = parse("mailtls-worker.service"), parse("mailtls-recover.service")
    for key in ("ReadWritePaths", "CapabilityBoundingSet", "ProtectHome", "StateDirectory", "SystemCallFilter",
                "RestrictAddressFamilies"):
        assert sorted(values(w, "Service", key)) == sorted(values(r, "Service", key)), key


def test_worker_checks_its_config_and_stops_retrying() -> None:
    u = parse("mailtls-worker.service")
    assert u["Service"]["ExecStartPre"] == [f"{MAILTLS} check-config --worker"]
    assert one(u, "Service", "ExecStart").startswith(f"{MAILTLS} worker")
    assert one(u, "Service", "KillMode") == "mixed"
    assert one(u, "Service", "Restart") == "on-failure"
    assert one(u, "Service", "TimeoutStopSec")
    assert int(one(u, "Unit", "StartLimitBurst")) > 0
    assert one(u, "Unit", "StartLimitIntervalSec")
    assert one(u, "Service", "EnvironmentFile") == "/etc/mailtls/worker.env"
    assert "mailtls-recover.service" in values(u, "Unit", "Wants")
    assert "mailtls-recover.service" in values(u, "Unit", "After")
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_recovery_runs_before_the_mail_daemons() -> None:
    u = parse("mailtls-recover.service")
    before = values(u, "Unit", "Before")
    # postfix@-.service: the real Postfix on Debian/Ubuntu, postfix.service only wraps it
    for daemon in ("postfix.service", "postfix@-.service", "dovecot.service", "exim4.service",
                   "mailtls-worker.service"):
        assert daemon in before, daemon
    assert one(u, "Service", "Type") == "oneshot"
    assert one(u, "Service", "ExecStart") == f"{MAILTLS} recover --boot"  # no probe, a daemon not up is fine
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_audit_timer_runs_the_local_audit() -> None:
    s, t = parse("mailtls-audit.service"), parse("mailtls-audit.timer")
    assert one(s, "Service", "Type") == "oneshot"
    assert one(s, "Service", "ExecStart") == f"{MAILTLS} audit --local"
    assert "ReadWritePaths" not in s["Service"], "the audit writes nothing but its state dir"
    assert one(t, "Timer", "OnCalendar")
    assert one(t, "Timer", "RandomizedDelaySec")
    assert one(t, "Timer", "Persistent") == "true"
    assert one(t, "Timer", "Unit") == "mailtls-audit.service"
    assert one(t, "Install", "WantedBy") == "timers.target"


def test_flower_is_unprivileged_and_loopback_only() -> None:
    u = parse("mailtls-flower.service")
    assert one(u, "Service", "DynamicUser") == "yes" or one(u, "Service", "User") not in ("", "root")
    assert one(u, "Service", "EnvironmentFile") == "/etc/mailtls/flower.env"
    assert u["Service"]["CapabilityBoundingSet"] == [""]
    # it must not see the host keys and env files in /etc/mailtls (but the Redis CA)
    assert "/etc/mailtls:ro" in values(u, "Service", "TemporaryFileSystem")
    assert all(p.lstrip("-").startswith("/etc/mailtls/redis-ca") for p in values(u, "Service", "BindReadOnlyPaths"))
    argv = one(u, "Service", "ExecStart").split()
    assert argv[:2] == [MAILTLS, "flower"]
    assert "--address" not in argv or argv[argv.index("--address") + 1] == "127.0.0.1"
    assert not any(a.startswith("--address=") and a != "--address=127.0.0.1" for a in argv)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_files_are_not_executable(unit: str) -> None:
    assert not (WORKERS / unit).stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
