"""`mailtls deploy --local` starts the validate_command as soon as it has read the
targets file, so the config check runs beside the command's own start-up. The deploy
collects that run's verdict only when it is the validated target's very command and
recent; every other way out kills it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailtls_tasks.cli.early import _peek
from mailtls_tasks.commands import Running
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.steps import validate as validate_step
from tests.support.host import MailHost
from tests.support.pki import PKI

LAUNCHER = [sys.executable, "-c", "from mailtls_tasks.cli import main; main()"]


def _mailtls(host: MailHost, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point (the launcher), as `mailtls` runs it."""
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, cwd=host.root, timeout=60,
                          env={**os.environ, "MAILTLS_CONFIG": str(host.config_path)})


def _files(host: MailHost, pki: PKI) -> tuple[str, str]:
    leaf = pki.leaf()
    c, k = host.root / f"{leaf.fingerprint[:8]}.crt", host.root / f"{leaf.fingerprint[:8]}.key"
    c.write_bytes(leaf.fullchain_pem)
    k.write_bytes(leaf.key_pem)
    return str(c), str(k)


@pytest.mark.parametrize(("argv", "expected"), [
    (["deploy", "mx", "--local", "--cert", "c", "--key", "k"], (None, "mx")),
    (["-v", "deploy", "--cert=c", "--key", "k", "--local", "--config", "/etc/t.toml", "mx1/mx"],
     ("/etc/t.toml", "mx1/mx")),
    (["deploy", "mx", "--cert", "c", "--key", "k"], None),  # distributed: its worker validates
    (["deploy", "mx", "--local", "--bogus"], None),  # not understood: no guess
    (["deploy", "mx", "other", "--local"], None),
    (["deploy", "--local", "--cert"], None),
    (["rollout", "--local"], None),
    (["deploy", "--local", "--help"], None),
])
def test_peek_finds_target_and_config_of_local_deploys_only(argv: list[str],
                                                            expected: tuple[str | None, str] | None) -> None:
    assert _peek(argv) == expected


def test_validate_command_starts_before_the_deploy_and_its_run_is_the_verdict(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    host.install("mx", pki.leaf())
    sleep = 1.0
    host.validate.hang(sleep)
    cert, key = _files(host, pki)

    p = _mailtls(host, "deploy", "mx", "--local", "--json", "--cert", cert, "--key", key)

    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["outcome"] == "deployed", p.stdout + p.stderr
    assert len(host.validate.calls) == 1  # the early run was the one used, not a second one
    # It started before the step did: a step that ran the command itself would last the whole sleep.
    assert out["steps"]["validate"]["ms"] < sleep * 1000, out["steps"]


def test_a_failing_early_run_rejects_the_deploy(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    old = pki.leaf()
    host.install("mx", old)
    before = host.snapshot()
    host.validate.fail(1)
    cert, key = _files(host, pki)

    p = _mailtls(host, "deploy", "mx", "--local", "--json", "--cert", cert, "--key", key)

    assert p.returncode == 2 and json.loads(p.stdout)["outcome"] == "rejected", p.stdout + p.stderr
    assert "validate_command failed" in json.loads(p.stdout)["error"]
    assert host.snapshot() == before and host.reload.calls == []


@pytest.mark.parametrize("how", ["unchanged", "rejected material", "unreadable key file", "invalid targets file"])
def test_an_early_run_nobody_needs_is_killed_on_exit(host: MailHost, pki: PKI, how: str) -> None:
    host.add_target("mx")
    leaf = pki.leaf()
    host.install("mx", leaf)
    cert, key = host.root / "same.crt", host.root / "same.key"
    cert.write_bytes(leaf.fullchain_pem)
    key.write_bytes(leaf.key_pem)
    if how == "unreadable key file":
        key.unlink()
    if how == "rejected material":  # the key of another certificate
        key.write_bytes(pki.leaf().key_pem)
    host.validate.hang(30)  # a run let finish would hold the exit up for 30 s
    target = "mx"
    if how == "invalid targets file":  # the launcher starts the command from it, then validation fails
        host.add_target("bad", key_mode="not a mode")
        target = "bad"

    t0 = time.monotonic()
    p = _mailtls(host, "deploy", target, "--local", "--cert", str(cert), "--key", str(key))
    took = time.monotonic() - t0

    assert (p.returncode == 0) == (how == "unchanged"), p.stdout + p.stderr
    if how == "unchanged":  # the others end before the started interpreter has even logged
        assert len(host.validate.calls) == 1, "the launcher did start it"
    assert took < 15, "the exit waited for a run it does not need"
    assert host.validate.running() == [], "the early run outlived the command"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_command_starts_up_kills_the_early_run(host: MailHost, pki: PKI,
                                                                   sig: signal.Signals) -> None:
    """Before the deploy installs its own handlers (it compensates on SIGTERM and SIGHUP),
    the launcher's unwind the process so that the early run dies with it."""
    host.add_target("mx")
    host.install("mx", pki.leaf())
    host.validate.hang(30)
    cert, key = _files(host, pki)
    p = subprocess.Popen([*LAUNCHER, "deploy", "mx", "--local", "--cert", cert, "--key", key], cwd=host.root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MAILTLS_CONFIG": str(host.config_path)})
    deadline = time.monotonic() + 10
    while not host.validate.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert host.validate.calls, "the launcher did not start the validate_command"
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)

    assert p.returncode != 0, out + err
    assert host.validate.running() == [], "the early run outlived the command"
    assert host.stray_temps() == []


# A SIGTERM exactly between the validate_command's start and its record in cli.early's
# `_early`: start_validate is wrapped to signal the process before it returns.
IN_THE_WINDOW = """
import os, signal, sys
from mailtls_tasks.cli import early
real = early.start_validate
def start_then_signal(raw, target):
    run = real(raw, target)
    print("validate pid", run.proc.pid, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    return run
early.start_validate = start_then_signal
sys.argv[0] = "mailtls"
from mailtls_tasks.cli import main
main()
"""


def test_a_signal_between_the_early_runs_start_and_its_record_kills_it(host: MailHost, pki: PKI) -> None:
    """It was left running: the handler unwound the process before the run was recorded,
    and its output held the caller's pipes open until it ended by itself."""
    host.add_target("mx")
    host.install("mx", pki.leaf())
    host.validate.hang(30)
    cert, key = _files(host, pki)
    p = subprocess.Popen([sys.executable, "-c", IN_THE_WINDOW, "deploy", "mx", "--local", "--cert", cert,
                          "--key", key], cwd=host.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MAILTLS_CONFIG": str(host.config_path)})
    out, err = p.communicate(timeout=15)
    assert p.returncode == 128 + signal.SIGTERM, out + err
    pids = [int(line.split()[-1]) for line in err.splitlines() if line.startswith("validate pid ")]
    assert pids, f"the validate_command never started: the window was not reached\n{err}"
    deadline = time.monotonic() + 5  # killed; then reaped by whoever inherited it
    while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pids[0]}").exists(), "the early run outlived the command"
    assert host.validate.running() == []


def test_a_stale_or_different_early_run_is_not_the_verdict(host: MailHost, pki: PKI,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    host.add_target("mx")
    host.install("mx", pki.leaf())
    cfg = host.config

    # Another command than the validated target's: killed, and the configured one decides.
    host.validate.fail(1)
    other = Running("/bin/true", "validate_command")
    new = pki.leaf()
    r = run_local(cfg, "mx", new.fullchain_pem, new.key_pem, early_validate=other)
    assert r.outcome == "rejected" and "validate_command failed" in (r.error or "")
    assert other.done and len(host.validate.calls) == 1
    host.validate.succeed()

    # The very command, but started too long before the step (a long wait for the lock).
    monkeypatch.setattr(validate_step, "EARLY_VALIDATE_MAX_AGE", 0.0)
    host.validate.hang(1.0)
    early = Running(cfg.target("mx").validate_command, "validate_command")
    r = run_local(cfg, "mx", new.fullchain_pem, new.key_pem, early_validate=early)
    assert r.outcome == "deployed", r.error
    assert early.done and early.proc.returncode == -9  # killed, not waited for: a fresh run decided
    assert r.steps["validate"].ms >= 1000


def test_the_mailtls_command_is_the_launcher() -> None:
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert 'mailtls = "mailtls_tasks.cli:main"' in text
