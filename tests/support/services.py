"""Real services as subprocesses: redis-server, mailtls workers, Flower.

Under ``CI=true`` a missing binary is a failure, never a skip: a suite that silently
skips its real tests is worse than none.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]


def require(binary: str) -> str:
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                         if os.path.exists(p)), None)
    if path:
        return path
    unavailable(f"{binary} is not installed (scripts/bootstrap.sh installs it)")


def unavailable(msg: str) -> NoReturn:
    """Skip a test whose real service is missing here -- but under CI=true fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " -- under CI a missing daemon is a failure")
    pytest.skip(msg)  # only outside CI: under CI=true the line above fails instead


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, gone: bool = False, host: str = "127.0.0.1") -> None:
    """Until something listens on host:port (or, with ``gone``, nothing does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                listening = True
        except OSError:
            listening = False
        if listening != gone:
            return
        time.sleep(0.05)
    state = "still listening" if gone else "nothing listening"
    raise TimeoutError(f"{state} on {host}:{port} after {timeout}s")


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RedisServer:
    """redis-server on a free loopback port; with ``tls`` (cert, key, ca paths) it speaks
    only TLS, and with ``user``/``password`` the default user is off (ACL AUTH required)."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None = None, user: str | None = None,
                 password: str | None = None, extra: list[str] | None = None) -> None:
        binary = require("redis-server")
        self.port = free_port()
        self.tls = tls
        self.user, self.password = user, password
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        if tls:
            cert, key, ca = tls
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if user:
            argv += ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all"]
        self.argv = argv + (extra or [])
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)

    def restart_empty(self) -> None:
        """Kill it and start it again on the same port with no data: what a restart
        without persistence, or a failover to an empty replica, looks like to clients."""
        _kill_group(self.proc, signal.SIGKILL)
        wait_port(self.port, gone=True)
        self.start()

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        _kill_group(self.proc)


class Worker:
    """``mailtls worker`` for one host config, as a process group that can be SIGKILLed."""

    def __init__(self, config: Path, broker: str, log: Path, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None, code: Path = REPO) -> None:
        self.config, self.broker, self.log_path = config, broker, log
        self.env = env or {}
        self.wrap = wrap or []  # e.g. a mount namespace of its own: this worker's "machine"
        self.code = code  # the tree mailtls_tasks is imported from (another release's, for an upgrade)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "mailtls_tasks.cli", "worker", "--config", str(self.config),
                "--broker", self.broker]

    def start(self, timeout: float = 30.0) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [*self.wrap, *self.argv()],
            stdin=subprocess.DEVNULL, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.code, env={**os.environ, "PYTHONPATH": str(self.code), **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log_path.read_bytes()[offset:].decode(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, *needles: str, timeout: float = 15.0) -> str:
        """The log, once one line holds every needle. A client sees a deploy end the
        moment its record is published, a little before the worker logs the task."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if any(all(n in ln for n in needles) for ln in log.splitlines()) or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        _kill_group(self.proc, signal.SIGKILL)

    def stop_main(self, timeout: float = 60.0) -> int:
        """SIGTERM to the main process alone, as systemd's KillMode=mixed sends it: a warm
        shutdown, which lets the running step finish. Its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGTERM, timeout=15)


class Flower:
    """``mailtls flower`` on a free port. ``auth=None``: no basic auth and an open API
    (a test's own loopback Flower, so a headless browser can load it)."""

    def __init__(self, broker: str, log: Path, auth: str | None = "ops:s3cret") -> None:
        self.port = free_port()
        self.auth = auth
        env = {**os.environ, "PYTHONPATH": str(REPO), "MAILTLS_BROKER_URL": broker}
        if auth:
            env["MAILTLS_FLOWER_BASIC_AUTH"] = auth  # never on argv: `mailtls flower` refuses --basic-auth
        else:
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailtls_tasks.cli", "flower", "--port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=REPO, env=env)
        wait_port(self.port, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> str:
        import base64
        import urllib.request

        headers = {"Authorization": "Basic " + base64.b64encode(self.auth.encode()).decode()} if self.auth else {}
        req = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(resp.read().decode())

    def screenshot(self, out: Path, path: str = "/tasks") -> Path:
        """The page as an operator sees it, rendered by a headless Chromium."""
        chromium = require("chromium")
        profile = out.parent / "chromium-profile"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1600,1000",
                        "--virtual-time-budget=8000", f"--screenshot={out}", self.url + path],
                       capture_output=True, timeout=120, check=False)
        if not out.exists():
            raise RuntimeError("chromium wrote no screenshot")
        return out

    def stop(self) -> None:
        _kill_group(self.proc)
