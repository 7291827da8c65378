"""Real faults, injected by the kernel's tracer: the fault matrix.

Every case runs a real ``mailtls`` process (a ``--local`` deploy, a ``recover``, or
a worker's pool child) under ``strace --inject``: SIGKILL at the N-th ``rename`` or
``fsync`` (a crash there), or ENOSPC / EIO / EXDEV returned by the N-th ``write``,
``fsync`` or ``rename``. Then, as after a reboot, ``mailtls recover`` runs, and the
invariant is checked:

* the live cert and key match, and are byte-for-byte the old set or the new set
  (chain included);
* the deploy has its outcome, and the outcome agrees with the files (deployed: new;
  rolled back or rejected: old); nothing of it is left unfinished or owned;
* the daemon (a TLS listener that re-reads its files on reload, like Postfix) serves
  the certificate on disk -- unless the outcome is ``failed``, whose error must then
  say what is on disk and what is served;
* no temp file is left beside the live ones.

``cases(level)`` lists the matrix: ``full`` (``make faults``) sweeps every N for
every fault; ``slice`` (``make test``) takes a fixed, spread subset of it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailtls_tasks.core import probe
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert, leaf_of_file
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, require
from tests.support.tlsserver import TLSServer

PY = sys.executable

# A reload that makes no write, rename or fsync of its own: the injector's counters
# then count only the process under test (children are traced too: -f).
RELOAD = """#!/bin/sh
if [ -e {marker} ]; then rm -f {marker}; exit 1; fi
exec /usr/bin/touch {trigger}
"""

FAULTS: dict[str, list[tuple[str, str]]] = {
    # syscall -> [(inject action, label)]
    "rename": [("signal=KILL", "SIGKILL"), ("error=EXDEV", "EXDEV"), ("error=ENOSPC", "ENOSPC")],
    "fsync": [("signal=KILL", "SIGKILL"), ("error=EIO", "EIO"), ("error=ENOSPC", "ENOSPC")],
    "write": [("error=ENOSPC", "ENOSPC"), ("error=EIO", "EIO")],
}
SCENARIOS = ("deploy", "rollback", "recovery")


@dataclass(frozen=True)
class Case:
    mode: str          # "local" or "worker"
    scenario: str      # deploy | rollback (reload fails, compensation runs) | recovery (of a crashed deploy)
    syscall: str
    action: str        # strace inject action, e.g. "signal=KILL"
    label: str
    n: int

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.scenario}-{self.syscall}-{self.label}-{self.n}"


@dataclass
class Result:
    case: Case
    outcome: str | None
    live: str               # "old" / "new"
    detail: str = ""
    notes: list[str] = field(default_factory=list)


class InvariantBroken(AssertionError):
    pass


class FaultHost:
    """One target (chain, key and cert in separate files), a TLS listener that re-reads
    them on reload, a reload script that can fail once, verify on."""

    def __init__(self, root: Path, pki: PKI, old: Issued, new: Issued) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.certs = root / "certs"
        self.certs.mkdir()
        self.cert, self.key, self.chain = (self.certs / n for n in ("cert.pem", "key.pem", "chain.pem"))
        self.old, self.new = old, new
        self.cert.write_bytes(old.cert_pem)
        self.chain.write_bytes(old.chain_pem)
        self.key.write_bytes(old.key_pem)
        os.chmod(self.key, 0o600)
        self.trigger = root / "reload-trigger"
        self.fail_marker = root / "reload-fails-once"
        self.reload = root / "reload.sh"
        self.reload.write_text(RELOAD.format(marker=self.fail_marker, trigger=self.trigger))
        os.chmod(self.reload, 0o755)
        self.server = TLSServer(self.cert, self.key, "tls", trigger=self.trigger)
        self.state = root / "state"
        (root / "new-cert.pem").write_bytes(new.fullchain_pem)
        (root / "new-key.pem").write_bytes(new.key_pem)
        self.security: dict[str, Any] | None = None
        self.lease, self.recovery_interval = 600.0, 30.0
        self.config = root / "targets.json"
        self.write_config()

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "host": "mxf", "state_dir": str(self.state), "deploy_lease": self.lease,
            "recovery_interval": self.recovery_interval,
            "targets": {"mx": {
                "cert_path": str(self.cert), "key_path": str(self.key), "chain_path": str(self.chain),
                "reload_command": str(self.reload), "validate_command": "", "command_timeout": 10,
                "post_deploy_verify": {"enabled": True, "endpoint": self.server.endpoint, "protocol": "tls",
                                       "timeout": 1.0, "interval": 0.05},
            }}}
        if self.security:
            cfg["security"] = self.security
        self.config.write_text(json.dumps(cfg))

    def env(self) -> dict[str, str]:
        return {**os.environ, "MAILTLS_CONFIG": str(self.config), "PYTHONPATH": str(REPO)}

    def cli(self, *args: str, prefix: list[str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*(prefix or []), PY, "-m", "mailtls_tasks.cli", *args], capture_output=True,
                              text=True, env=self.env(), cwd=self.root, timeout=timeout)

    def deploy_args(self, deploy_id: str) -> list[str]:
        return ["deploy", "mx", "--local", "--cert", str(self.root / "new-cert.pem"), "--key",
                str(self.root / "new-key.pem"), "--deploy-id", deploy_id, "--json"]

    def close(self) -> None:
        self.server.close()

    # -- the invariant ------------------------------------------------------------------
    def which_set(self) -> str:
        cert, key, chain = self.cert.read_bytes(), self.key.read_bytes(), self.chain.read_bytes()
        if not key_matches_cert(key, cert):
            raise InvariantBroken("the live key does not match the live cert")
        for name, s in (("old", self.old), ("new", self.new)):
            if (cert, key, chain) == (s.cert_pem, s.key_pem, s.chain_pem):
                return name
        raise InvariantBroken("the live files are neither the old set nor the new set")

    def check(self, deploy_id: str) -> tuple[str | None, str]:
        """Assert the invariant; return (outcome, which set is live)."""
        live = self.which_set()
        j = Journal(str(self.state))
        rec = j.load("mx", deploy_id)
        if rec is None:
            if live != "old":
                raise InvariantBroken("the new set is live but the journal has no record of the deploy")
            outcome = None
        else:
            if not rec.finished:
                raise InvariantBroken(f"deploy still unfinished after recovery (phase {rec.phase})")
            outcome = rec.outcome
            expected = {"deployed": "new", "rolled_back": "old", "rejected": "old"}.get(outcome or "")
            if expected and expected != live:
                raise InvariantBroken(f"outcome {outcome} but the {live} set is live")
            if outcome == "failed" and "on disk:" not in (rec.error or ""):
                raise InvariantBroken(f"failed without saying what is on disk: {rec.error}")
        if j.owners():
            raise InvariantBroken(f"files still owned after recovery: {j.owners()}")
        strays = [p.name for p in self.certs.iterdir() if ".mailtls-" in p.name]
        if strays:
            raise InvariantBroken(f"temp files left: {strays}")
        served = probe.probe("127.0.0.1", self.server.port, "tls", timeout=3).fingerprint
        leaf = leaf_of_file(self.cert.read_bytes())
        assert leaf is not None
        from mailtls_tasks.core.material import fingerprint

        if served != fingerprint(leaf) and outcome != "failed":
            raise InvariantBroken(f"the daemon serves {served[:12]}, not the {live} cert on disk")
        return outcome, live


def strace_prefix(case: Case) -> list[str]:
    # No --seccomp-bpf here: strace 6.1 then skips the injection (seen on Debian 12).
    return [require("strace"), "-f", "-qq", "-o", "/dev/null", "-e", f"trace={case.syscall}",
            "-e", f"inject={case.syscall}:{case.action}:when={case.n}"]


def count_syscalls(host: FaultHost, args: list[str], syscall: str) -> int:
    """How many times ``mailtls ARGS`` makes ``syscall`` (all processes), fault-free."""
    return count_calls(args, syscall, host.env(), host.root)


def count_calls(args: list[str], syscall: str, env: dict[str, str], cwd: Path) -> int:
    """How many times ``mailtls ARGS``, run in ``cwd`` with ``env``, makes ``syscall``
    (all processes), fault-free: the N a sweep of injected faults goes up to."""
    out = cwd / f"count-{syscall}.txt"
    p = subprocess.run([require("strace"), "-f", "--seccomp-bpf", "-qq", "-c", "-o", str(out), "-e",
                        f"trace={syscall}", PY, "-m", "mailtls_tasks.cli", *args],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=90)
    if p.returncode not in (0, 3):
        raise RuntimeError(f"counting run failed ({p.returncode}): {p.stdout}{p.stderr}")
    for line in out.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] == syscall:
            return int(parts[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return 0


def first_commit_rename(host: FaultHost, deploy_id: str) -> int:
    """The index of the first rename that puts a staged file in place (commit starts)."""
    out = host.root / "renames.txt"
    subprocess.run([require("strace"), "-f", "--seccomp-bpf", "-qq", "-o", str(out), "-e", "trace=rename",
                    PY, "-m", "mailtls_tasks.cli", *host.deploy_args(deploy_id)], capture_output=True, env=host.env(),
                   cwd=host.root, timeout=90)
    lines = [ln for ln in out.read_text().splitlines() if "rename(" in ln]
    for i, ln in enumerate(lines, 1):
        src = ln.split('rename("', 1)[1].split('"', 1)[0]
        if ".mailtls-" in os.path.basename(src):
            return i
    raise RuntimeError("no commit rename seen")


def _reset(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)


def prepare_recovery(host: FaultHost, deploy_id: str, kill_at: int) -> None:
    """A deploy killed between two commit renames: a mismatched pair really is live."""
    p = host.cli(*host.deploy_args(deploy_id), prefix=strace_prefix(
        Case("local", "recovery", "rename", "signal=KILL", "SIGKILL", kill_at)))
    if p.returncode not in (-9, 137):
        raise RuntimeError(f"the deploy to recover was not killed ({p.returncode}): {p.stdout}{p.stderr}")


def run_local_case(root: Path, pki: PKI, case: Case, leaves: tuple[Issued, Issued], kill_at: int) -> Result:
    _reset(root)
    host = FaultHost(root, pki, *leaves)
    try:
        did = "fault-1"
        if case.scenario == "rollback":
            host.fail_marker.touch()
        if case.scenario == "recovery":
            prepare_recovery(host, did, kill_at)
            host.cli("recover", prefix=strace_prefix(case))
        else:
            host.cli(*host.deploy_args(did), prefix=strace_prefix(case))
        after = host.cli("recover")  # what the next run, or the boot-time unit, does
        if after.returncode not in (0, 4):
            raise InvariantBroken(f"recover exited {after.returncode}: {after.stdout}{after.stderr}")
        outcome, live = host.check(did)
        return Result(case, outcome, live)
    finally:
        host.close()


def local_cases(level: str, counts: dict[tuple[str, str], int]) -> Iterator[Case]:
    """Every (scenario, syscall, action) for N in 1..count (full) or a spread subset (slice)."""
    for scenario in SCENARIOS:
        for syscall, actions in FAULTS.items():
            total = counts[(scenario, syscall)]
            for action, label in actions:
                if level == "full":
                    ns = list(range(1, total + 1))
                else:
                    ns = sorted({1, max(1, total // 2), total} if label == "SIGKILL" else {max(1, total // 3)})
                    if label == "SIGKILL" and syscall == "rename" and scenario != "recovery":
                        ns = list(range(1, total + 1, 4))  # the rename kills are the heart of it
                for n in ns:
                    yield Case("local", scenario, syscall, action, label, n)


def measure(root: Path, pki: PKI, leaves: tuple[Issued, Issued]) -> tuple[dict[tuple[str, str], int], int]:
    """Syscall counts per scenario (fault-free runs), and where a commit starts."""
    counts: dict[tuple[str, str], int] = {}
    _reset(root)
    host = FaultHost(root, pki, *leaves)
    try:
        kill_at = first_commit_rename(host, "probe-1") + 2  # chain and key renamed, not the cert
    finally:
        host.close()
    for scenario in SCENARIOS:
        for syscall in FAULTS:
            _reset(root)
            host = FaultHost(root, pki, *leaves)
            try:
                if scenario == "rollback":
                    host.fail_marker.touch()
                if scenario == "recovery":
                    prepare_recovery(host, "probe-2", kill_at)
                    counts[(scenario, syscall)] = count_syscalls(host, ["recover"], syscall)
                else:
                    counts[(scenario, syscall)] = count_syscalls(host, host.deploy_args("probe-2"), syscall)
            finally:
                host.close()
    return counts, kill_at


def table(results: list[Result], failures: list[tuple[Case, str]]) -> str:
    """Markdown: per mode, scenario and fault, how many cases ran and how they ended."""
    rows: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for r in results:
        key = (r.case.mode, r.case.scenario, r.case.syscall, r.case.label)
        d = rows.setdefault(key, {})
        d[r.outcome or "no record"] = d.get(r.outcome or "no record", 0) + 1
    for c, _ in failures:
        d = rows.setdefault((c.mode, c.scenario, c.syscall, c.label), {})
        d["INVARIANT BROKEN"] = d.get("INVARIANT BROKEN", 0) + 1
    modes = {"local": "`--local`", "worker": "worker (all killed)", "child": "worker (pool child killed)"}
    lines = ["| mode | scenario | injected | cases | ended |", "|---|---|---|---|---|"]
    for (mode, scenario, syscall, label), d in sorted(rows.items()):
        ended = ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
        lines.append(f"| {modes.get(mode, mode)} | {scenario} | {label} at `{syscall}` | {sum(d.values())} | {ended} |")
    return "\n".join(lines)


def wait_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.1)


# ----------------------------------------------------------------------------- worker mode
class WorkerRig:
    """A FaultHost whose deploys come through Redis to a real worker; faults are injected
    into the worker's pool child by attaching strace to it (counting from the deploy).
    One rig serves many cases: ``reset()`` puts the old set back and forgets the journal."""

    def __init__(self, root: Path, pki: PKI, leaves: tuple[Issued, Issued], broker: str, pipeline: Any) -> None:
        from tests.support.services import Worker

        _reset(root)
        self.host = FaultHost(root, pki, *leaves)
        self.host.security = pipeline.enroll("mxf", root / "keys")
        # A message a killed worker had taken off the queue but not yet recorded as
        # unacked is lost (kombu's BRPOP, then its bookkeeping: docs/protocol.md); its
        # deploy is then ended by the sweep once its lease runs out. A short lease and
        # sweep bring that inside a case's 90 s; every step here takes well under 20 s.
        self.host.lease, self.host.recovery_interval = 20.0, 5.0
        self.host.write_config()
        self.broker, self.pipeline = broker, pipeline
        self.worker = Worker(self.host.config, broker, root / "worker.log")
        # (scenario, syscall) -> the call numbers that are writes to the pool's own pipe
        # or a socket, not to a file (filled by worker_count)
        self.ipc: dict[tuple[str, str], set[int]] = {}

    def reset(self, restart: bool = False) -> None:
        """Back to the old set and an empty journal; ``restart``: with a fresh worker too
        (after a broken case, so that one failure cannot cascade into the next cases)."""
        h = self.host
        if restart:
            assert self.worker.proc is not None
            kill_group(self.worker.proc.pid)
        for stray in h.certs.glob(".*.mailtls-*"):
            stray.unlink()
        for path, data in ((h.chain, h.old.chain_pem), (h.key, h.old.key_pem), (h.cert, h.old.cert_pem)):
            path.write_bytes(data)
        shutil.rmtree(h.state, ignore_errors=True)
        if restart:
            self.worker.start()
        h.fail_marker.unlink(missing_ok=True)
        h.trigger.touch()
        probe.probe("127.0.0.1", h.server.port, "tls", timeout=3)  # the listener re-reads the old set

    def child(self) -> int:
        assert self.worker.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            newest = ["pgrep", "-n", "-P", str(self.worker.proc.pid)]
            out = subprocess.run(newest, capture_output=True, text=True).stdout
            pids = [int(p) for p in out.split()]
            if pids:
                return pids[0]
            time.sleep(0.05)
        raise RuntimeError("no pool child")

    def attach(self, args: list[str]) -> subprocess.Popen[bytes]:
        """strace attached to the pool child. The child listed may be one a previous case
        killed, still being reaped while billiard starts its replacement: such a child is
        skipped. Once strace runs, a child that dies has been killed by the injection
        itself (an early N): that is the case running, not a failure to attach."""
        for _ in range(50):
            pid = self.child()
            try:
                if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                    raise FileNotFoundError
            except FileNotFoundError:
                time.sleep(0.1)
                continue
            tracer = subprocess.Popen([require("strace"), "-qq", "-p", str(pid), *args], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    return tracer
                if "TracerPid:\t0\n" not in status or "State:\tZ" in status:
                    return tracer
                time.sleep(0.02)
            raise RuntimeError("strace did not attach")
        raise RuntimeError("no live pool child to attach to")

    def enqueue(self, deploy_id: str, batch: bool = False) -> Any:
        """The deploy, as a pipeline sends it; ``batch``: as the one member of a
        ``mailtls.batch`` (``deploy_many``'s path: the whole run in one task)."""
        from mailtls_tasks.distributed.workflow import deploy

        if not batch:
            return deploy("mx", self.host.new.fullchain_pem, self.host.new.key_pem, broker_url=self.broker,
                          host="mxf", deploy_id=deploy_id, pipeline=str(self.pipeline.path))
        from mailtls_tasks.distributed.coordination import Coordinator
        from mailtls_tasks.distributed.workflow import _seal, enqueue_batch
        from mailtls_tasks.security.keys import load_pipeline

        co = Coordinator.for_url(self.broker)
        envelope = _seal(co, load_pipeline(str(self.pipeline.path)), "mxf/mx", self.host.new.fullchain_pem,
                         self.host.new.key_pem, None, force=False, deploy_id=deploy_id, also=None)
        return enqueue_batch(co, [envelope], None)[0]

    def close(self) -> None:
        self.worker.stop()
        self.host.close()


_RUN = itertools.count(1)


def worker_count(rig: WorkerRig, syscall: str, scenario: str = "deploy") -> int:
    """How many ``syscall`` calls the pool child makes in one deploy (or rollback);
    remembers which of them are Celery's own IPC (``rig.ipc``, see ``worker_cases``)."""
    rig.reset()
    if scenario == "rollback":
        rig.host.fail_marker.touch()
    out = rig.host.root / f"wcount-{scenario}-{syscall}.txt"
    tracer = rig.attach(["-y", "-o", str(out), "-e", f"trace={syscall}"])
    rig.enqueue(f"wprobe-{os.getpid()}-{next(_RUN)}", batch=scenario == "batch").get(60)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(10)
    calls = [line for line in out.read_text().splitlines() if line.startswith(f"{syscall}(")]
    rig.ipc[(scenario, syscall)] = {n for n, line in enumerate(calls, 1)
                                    if "<pipe:" in line.split(",")[0] or "<socket:" in line.split(",")[0]}
    return len(calls)


def run_worker_case(rig: WorkerRig, case: Case, whole_worker: bool) -> Result:
    """``whole_worker``: when the pool child is killed, the whole worker goes with it
    (then restarts); else only the child dies and Celery redelivers its message."""
    rig.reset()
    if case.scenario == "rollback":
        rig.host.fail_marker.touch()  # the reload fails once: the rollback task runs, under the same faults
    notes = []
    did = f"wf-{os.getpid()}-{next(_RUN)}"
    tracer = rig.attach(["-o", "/dev/null", "-e", f"trace={case.syscall}", "-e",
                         f"inject={case.syscall}:{case.action}:when={case.n}"])
    try:
        handle = rig.enqueue(did, batch=case.scenario == "batch")
        deadline = time.monotonic() + 90
        restarted = False
        rec: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            rec = handle.status()
            if rec and rec.get("outcome"):
                break
            if tracer.poll() is not None and whole_worker and not restarted:
                assert rig.worker.proc is not None
                kill_group(rig.worker.proc.pid)
                notes.append("worker killed")
                rig.worker.start()  # recovery runs before it consumes anything
                restarted = True
            time.sleep(0.05)
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)
            wait_gone(tracer, 10)
    try:
        if not (rec and rec.get("outcome")):
            raise InvariantBroken(f"the deploy never ended in Redis (last record: {rec})")
        after = rig.host.cli("recover")
        if after.returncode not in (0, 4):
            raise InvariantBroken(f"recover exited {after.returncode}: {after.stdout}{after.stderr}")
        outcome, live = rig.host.check(did)
        if rec.get("outcome") != outcome and not (outcome is None and rec.get("outcome") == "rejected"):
            # (no journal record and "rejected" in Redis: it failed before it reached the host)
            raise InvariantBroken(f"Redis says {rec.get('outcome')}, the host's journal {outcome}")
    except InvariantBroken:
        rig.reset(restart=True)
        raise
    return Result(case, outcome, live, notes=notes)


def worker_cases(level: str, counts: dict[tuple[str, str], int],
                 ipc: dict[tuple[str, str], set[int]] | None = None) -> Iterator[Case]:
    """The worker-mode cases. An error injected into a write to billiard's pool pipe
    (or a socket) is left out: a pipe cannot fail with ENOSPC or EIO, and billiard,
    having sent a frame's header, cannot recover from a failed body (the parent then
    waits for the step until its hard time limit). A SIGKILL there is kept: a process
    can die at any call."""
    for mode in ("worker", "child"):
        for scenario in ("deploy", "rollback", "batch"):
            for syscall, actions in FAULTS.items():
                total = counts.get((scenario, syscall), 0)
                for action, label in actions:
                    if scenario == "batch":  # the whole run in one task: killed anywhere in it
                        ns = ([] if (label, syscall) != ("SIGKILL", "rename") else
                              list(range(1, total + 1)) if level == "full" else [1, total // 2, total])
                    elif level == "full":
                        ns = list(range(1, total + 1))
                    elif scenario == "rollback":
                        ns = [total - 2] if (label, syscall, mode) == ("SIGKILL", "rename", "worker") else []
                    elif label == "SIGKILL" and syscall == "rename":
                        # every third rename of a whole-worker kill: each step's first journal save among them
                        ns = list(range(1, total + 1, 3)) if mode == "worker" else [1, total // 2, total]
                    elif mode == "child" and label in ("EIO", "EXDEV"):
                        ns = [max(1, total // 2)]
                    else:
                        ns = []
                    skip = (ipc or {}).get((scenario, syscall), set()) if action.startswith("error=") else set()
                    for n in ns:
                        if n in skip:  # the full sweep leaves it out; a slice takes the next file write
                            later = (k for k in range(n, total + 1) if k not in skip)
                            m = None if level == "full" else next(later, None)
                            if m is None:
                                continue
                            n = m
                        yield Case(mode, scenario, syscall, action, label, max(1, n))
