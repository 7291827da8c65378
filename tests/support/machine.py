"""A Debian 13 machine with systemd as PID 1: the cached trixie root
(scripts/trixie-root.sh), booted by systemd-nspawn with a network of its own.

What a boot writes (configs, the journal, mailtls's state) goes to an overlay upper
directory of the test's, so the cached root is never changed by a boot and the same
machine boots again after a crash with its disk as the crash left it. Every mount is
made in a mount namespace of its own (``unshare -m``) and vanishes with the process that
made it. Commands run inside with ``nsenter`` into the container's init.

The package itself is installed into the cached root once per tree (``make install``
from a copy of the tree, as an operator does), by the lane script that knows this
machine's pip set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

from .services import REPO, require

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTALLED = "/opt/mailtls/.mailtls-tree"


def tree_digest() -> str:
    """What `make install` would install: the package and pyproject."""
    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    for p in sorted((REPO / "mailtls_tasks").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def trixie_root() -> Path:
    out = subprocess.run(["sh", str(REPO / "scripts" / "trixie-root.sh")], capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/trixie-root.sh failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def install_package(root: Path) -> None:
    """``make install`` of this tree into the cached root (/opt/mailtls, the command in
    /usr/local/bin, as the units expect), unless this very tree is installed there."""
    digest = tree_digest()
    marker = root / INSTALLED.lstrip("/")
    if marker.exists() and marker.read_text() == digest:
        return
    script = ("make install SRC=/src INSTALL_PYTHON=/usr/bin/python3 >/tmp/install.log 2>&1 "
              "&& /opt/mailtls/bin/pip install -q --no-deps --force-reinstall '/src[flower]' >>/tmp/install.log 2>&1 "
              f"&& echo -n {digest} > {INSTALLED} || {{ cat /tmp/install.log; exit 1; }}")
    out = subprocess.run(["sh", str(REPO / "scripts" / "trixie-lane.sh"), "sh", "-c", script], capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"make install in the trixie root failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")


class Machine:
    """The root, overlaid with ``work/upper``, booted with ``systemd-nspawn -b``."""

    def __init__(self, root: Path, work: Path, hostname: str) -> None:
        self.nspawn = require("systemd-nspawn")
        self.root, self.work, self.hostname = root, work, hostname
        self.upper, self.scratch, self.merged = work / "upper", work / "overlay-work", work / "machine"
        for d in (self.upper, self.scratch, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        self.console = work / "console.log"
        # A machine id of its own, kept across its reboots: the root's (written when its
        # packages were installed) is every machine's, and the host's own where the host is
        # a copy of the root (make test-as-trixie), which nspawn refuses to boot beside.
        machine_id = self.path("/etc/machine-id")
        if not machine_id.exists():
            machine_id.parent.mkdir(parents=True, exist_ok=True)
            machine_id.write_text(uuid.uuid4().hex + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def _mounts(self) -> str:
        return (f"mount -t overlay overlay -o lowerdir={self.root},upperdir={self.upper},workdir={self.scratch} "
                f"{self.merged}")

    # -- offline: the machine's disk, not booted ------------------------------------
    def path(self, inside: str) -> Path:
        """Where a file of the machine is written before it boots: the overlay's upper
        directory (what the machine sees over the root)."""
        return self.upper / inside.lstrip("/")

    def offline(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command in the machine's file system, not booted (chroot): systemctl enable,
        postconf -e. Raises with its output if it fails."""
        inner = f"{self._mounts()} && exec chroot {self.merged} /usr/bin/env -i PATH={PATH} {shlex.join(argv)}"
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", inner],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{argv} in the machine failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return res

    # -- booted ---------------------------------------------------------------------
    def boot(self, timeout: float = 90) -> None:
        """Boot, and wait until systemd says the boot is over (running or degraded)."""
        inner = (f"mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && {self._mounts()} && "
                 f"exec {self.nspawn} --register=no --keep-unit --private-network --console=pipe "
                 f"--machine={self.hostname} -D {self.merged} -b")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec", inner],
                                     stdin=subprocess.DEVNULL, stdout=self.console.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        self.leader = None
        while self.leader is None:
            self.leader = self._find_leader()
            if self.leader is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the machine did not boot:\n{self.console.read_text()[-3000:]}")
                time.sleep(0.2)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"boot not finished after {timeout}s ({state}):\n"
                                   + self.run("systemctl", "--failed", "--no-pager", check=False).stdout
                                   + "\n-- console --\n" + self.console.read_text(errors="replace")[-3000:])
            time.sleep(0.3)

    def _find_leader(self) -> int | None:
        """The host pid of the machine's PID 1: the systemd below our nspawn."""
        assert self.proc is not None
        pending = [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                try:
                    comm = Path(f"/proc/{c}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd":
                    return c
                pending.append(c)
        return None

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A command inside the booted machine, as root, in all of its namespaces."""
        assert self.leader is not None, "not booted"
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        # -r -w: the machine's root and working directory too. Entering its mount namespace
        # alone leaves a caller that is itself chrooted (make test-as-trixie) at the
        # namespace's root mount, which is the real machine's /, not the container's.
        res = subprocess.run([require("nsenter"), "-t", str(self.leader), "-a", "-r", "-w", "/usr/bin/env", "-i",
                              f"PATH={PATH}", "LANG=C.UTF-8", *extra, *argv], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{argv} in the machine exited {res.returncode}:\n{res.stdout}{res.stderr}")
        return res

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", *args, check=False).stdout

    def power_off(self) -> None:
        """Pull the plug: SIGKILL to the machine's PID 1 kills every process in it, with
        no shutdown at all (no unit stops, nothing flushed that was not already)."""
        if self.leader is not None:
            try:
                os.kill(self.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_gone()

    def shutdown(self) -> None:
        """A clean halt: SIGTERM to nspawn halts the container (after a boot that never
        got going, the fallback of ``_wait_gone`` kills it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # unshare exec'd sh, sh exec'd nspawn: this is nspawn
        self._wait_gone(60)

    def _wait_gone(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # the machine's PID 1 is not in nspawn's process group: kill it, and with it
            # every process of the machine, then nspawn
            for pid in (self.leader or self._find_leader(), None):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(pid, signal.SIGKILL) if pid else os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc, self.leader = None, None
