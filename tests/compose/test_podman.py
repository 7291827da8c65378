"""compose/ for real: podman and podman-compose run compose/docker-compose.yml (Redis, the
mail host with Postfix, Dovecot and the worker, Flower) from images built on a Debian 13
base imported from the cached trixie root (no registry is reachable here; Docker users
keep the public images). From this machine, with the pipeline's keys here and Redis
published on loopback (compose/redis-on-loopback.yml): a deploy ends deployed and
verified on the published ports, a bad one (Dovecot never really reloads) rolls back,
and Flower's task list shows both."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.material import fingerprint, leaf_of_file
from tests.support.services import REPO, require

# The first build on a machine installs the daemons and the package into the image (apt
# and pip in the build): minutes, beyond the suite's usual 300 s; later ones take layers
# from podman's cache.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

PROJECT = "mailtlstest"
FILES = ["-f", str(REPO / "compose" / "docker-compose.yml"), "-f", str(REPO / "compose" / "redis-on-loopback.yml")]
BROKER = "redis://127.0.0.1:16379/0"
NAME = "mail.compose.test"
# podman on this kind of machine: the default ulimits are not permitted, and crun
# refuses its hybrid cgroups (shared/notes/platforms.md). Podman 5 (Debian 13) run as root
# also raises every container's open-files and process limits to its own defaults unless
# they are named: the limits this process has are ones this machine permits. Podman 4.3
# (Debian 12) refuses a named nproc here ("error setting rlimit type 6") and needs none.


def containers_conf(podman: str) -> str:
    version = subprocess.run([podman, "--version"], capture_output=True, text=True, timeout=30).stdout.split()[-1]
    ulimits = ""
    if int(version.split(".")[0]) >= 5:
        (nofile, nofile_max), (nproc, nproc_max) = (resource.getrlimit(resource.RLIMIT_NOFILE),
                                                    resource.getrlimit(resource.RLIMIT_NPROC))
        ulimits = f'"nofile={nofile}:{nofile_max}", "nproc={nproc}:{nproc_max}"'
    return f'[containers]\ndefault_ulimits = [{ulimits}]\n[engine]\nruntime = "runc"\n'


PIP_PATHS = ("/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip", "/opt/wheels", "/opt/pypi", "/opt/pypi-more")


class Compose:
    def __init__(self, work: Path) -> None:
        self.podman = require("podman")
        require("runc")
        self.tool = str(Path(sys.executable).parent / "podman-compose")
        if not os.path.exists(self.tool):
            pytest.fail("podman-compose is not installed in this venv (pyproject's dev extra installs it)")
        self.work = work
        conf = work / "containers.conf"
        conf.write_text(containers_conf(self.podman))
        base = subprocess.run(["sh", str(REPO / "scripts" / "podman-base-images.sh")], capture_output=True,
                              text=True, timeout=900, env={**os.environ, "CONTAINERS_CONF": str(conf)})
        assert base.returncode == 0, base.stderr[-3000:]
        image = base.stdout.strip().splitlines()[-1]
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "MAILTLS_BASE_IMAGE": image,
                    "MAILTLS_REDIS_IMAGE": image}

    def compose(self, *args: str, timeout: float = 600, extra: list[str] | None = None) -> str:
        res = subprocess.run([self.tool, "-p", PROJECT, *FILES, *(extra or []), *args], capture_output=True,
                             text=True, timeout=timeout, env=self.env, cwd=self.work)
        assert res.returncode == 0, f"podman-compose {args}: {res.returncode}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        return res.stdout

    def podman_(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([self.podman, *args], capture_output=True, text=True, timeout=300, env=self.env)
        if check:
            assert res.returncode == 0, f"podman {args}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        return res

    def exec(self, *argv: str) -> str:
        return self.podman_("exec", f"{PROJECT}_mailhost_1", *argv).stdout

    def build_args(self) -> list[str]:
        """The image's pip runs with this machine's pip set-up (index, find-links, CA)."""
        mounts = [f"-v {p}:{p}:ro" for p in PIP_PATHS if os.path.exists(p)]
        mounts.append("-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro")
        return ["--podman-build-args", " ".join(["--network=host", *mounts])]

    def down(self) -> None:
        subprocess.run([self.tool, "-p", PROJECT, *FILES, "down", "-v"], capture_output=True, timeout=300,
                       env=self.env, cwd=self.work)
        self.podman_("network", "rm", "-f", f"{PROJECT}_default", check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    c = Compose(tmp_path_factory.mktemp("compose"))
    c.down()  # what a run that died left behind
    c.compose("build", extra=c.build_args(), timeout=900)
    try:
        c.compose("up", "-d")
        deadline = time.monotonic() + 120
        while "mailtls@mx1 ready." not in c.podman_("logs", f"{PROJECT}_mailhost_1", check=False).stdout + \
                c.podman_("logs", f"{PROJECT}_mailhost_1", check=False).stderr:
            assert time.monotonic() < deadline, c.podman_("logs", f"{PROJECT}_mailhost_1", check=False).stderr[-3000:]
            time.sleep(0.5)
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def pipeline(stack: Compose) -> Path:
    """The pipeline's key and pinned host key, on this machine (the demo made them in
    the mail host's keys volume: here they are copied out, as a real pipeline keeps its
    own)."""
    d = stack.work / "pipeline"
    d.mkdir(mode=0o700)
    key = d / "pipeline.key"
    key.write_text(stack.exec("cat", "/keys/pipeline.key"))
    key.chmod(0o600)
    pinned = stack.exec("cat", "/keys/pipeline.toml").replace("/keys/pipeline.key", str(key))
    path = d / "pipeline.toml"
    path.write_text(pinned)
    path.chmod(0o600)
    return path


def _bundle(stack: Compose, directory: str, into: Path) -> tuple[Path, Path, str]:
    into.mkdir(exist_ok=True)
    cert, key = into / "fullchain.pem", into / "privkey.pem"
    stack.exec("demo-cert", directory)
    cert.write_text(stack.exec("cat", f"{directory}/fullchain.pem"))
    key.write_text(stack.exec("cat", f"{directory}/privkey.pem"))
    key.chmod(0o600)
    leaf = leaf_of_file(cert.read_bytes())
    assert leaf is not None
    return cert, key, fingerprint(leaf)


def _deploy(pipeline: Path, target: str, cert: Path, key: Path) -> tuple[int, dict[str, object]]:
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", target, "--cert", str(cert), "--key",
                        str(key), "--broker", BROKER, "--pipeline", str(pipeline), "--json", "--wait", "120"],
                       capture_output=True, text=True, timeout=180)
    return p.returncode, json.loads(p.stdout)


def _served(port: int, protocol: str) -> str:
    return probe.probe("127.0.0.1", port, protocol, server_name=NAME).fingerprint


def test_a_deploy_from_this_machine_is_verified_and_a_bad_one_rolls_back(stack: Compose, pipeline: Path,
                                                                       tmp_path: Path) -> None:
    cert, key, fp = _bundle(stack, "/keys/compose-test-1", tmp_path / "one")
    code, res = _deploy(pipeline, "mx1/smtp", cert, key)
    assert code == 0 and res["outcome"] == "deployed" and res["served_fingerprint_sha256"] == fp, res
    assert _served(2525, "smtp") == _served(4465, "smtps") == fp  # the published ports, from here

    before = _served(9993, "imaps")
    stack.exec("sh", "-c", "mv /usr/bin/doveadm /usr/bin/doveadm.real && printf '#!/bin/sh\\nexit 0\\n' "
               "> /usr/bin/doveadm && chmod 0755 /usr/bin/doveadm")  # a reload that never happens
    try:
        bad_cert, bad_key, bad_fp = _bundle(stack, "/keys/compose-test-2", tmp_path / "two")
        code, bad = _deploy(pipeline, "mx1/imap", bad_cert, bad_key)
    finally:
        stack.exec("mv", "-f", "/usr/bin/doveadm.real", "/usr/bin/doveadm")
    assert code == 3 and bad["outcome"] == "rolled_back", bad
    assert "did not serve" in str(bad["error"])
    assert _served(9993, "imaps") == before != bad_fp
    assert stack.exec("cat", "/etc/dovecot/private/dovecot.key") != bad_key.read_text()

    # Flower, published on loopback with the demo's basic auth, shows both deploys
    auth = base64.b64encode(b"demo:demo").decode()
    req = urllib.request.Request("http://127.0.0.1:5555/api/tasks", headers={"Authorization": f"Basic {auth}"})
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(req, timeout=10) as resp:
            tasks = json.loads(resp.read())
        args = " ".join(str(t.get("args")) for t in tasks.values())
        if (str(res["deploy_id"]) in args and str(bad["deploy_id"]) in args) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert f"mx1/smtp · {res['deploy_id']}" in args and f"mx1/imap · {bad['deploy_id']}" in args, args
    rows = {t["name"]: t for t in tasks.values() if str(bad["deploy_id"]) in str(t.get("args"))}
    states = {n: t["state"] for n, t in rows.items()}
    # the rollback row ends the deploy that did not deploy: a failure naming how it ended
    assert states.get("mailtls.rollback") == "FAILURE" and states.get("mailtls.verify") == "FAILURE", states
    assert "rolled_back" in str(rows["mailtls.rollback"].get("exception")), rows["mailtls.rollback"]
