"""The operator's install path, for real: a wheel is built, `make install` puts it into a
clean venv of its own (what a Debian 12 host needs: no --break-system-packages), and the
installed command works: --version, keys created as the README says, and
`check-config --worker` on the example targets file, refusing before the [security]
section is filled in and passing after."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]


def _run(argv: list[str], cwd: Path | None = None, umask: int | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask) and None))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"  # a clean copy: the build must not depend on the work tree's leftovers
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "dist", "build",
                                                              "__pycache__", ".*_cache", ".hypothesis"))
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(src)])
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = list((tmp / "dist").glob("mailtls_tasks-*.whl"))
    assert len(wheels) == 1, wheels
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "MAILTLS_"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    make = _run(["make", "-C", str(REPO), "install", f"PREFIX={tmp / 'opt'}", f"BINDIR={tmp / 'bin'}",
                 f"SRC={wheels[0]}"], env=env)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-3000:]
    assert f"mailtls {VERSION}" in make.stdout  # make install ends by running the linked command
    return tmp


@pytest.mark.integration
def test_the_wheel_installs_into_a_clean_venv_and_runs(installed: Path) -> None:
    mailtls = installed / "bin" / "mailtls"
    assert mailtls.is_symlink() and os.readlink(mailtls) == str(installed / "opt" / "bin" / "mailtls")
    out = _run([str(mailtls), "--version"])
    assert out.returncode == 0 and out.stdout.strip() == f"mailtls {VERSION}"
    # the venv is clean: the package came from the wheel, not from this checkout
    where = _run([str(installed / "opt" / "bin" / "python"), "-c",
                  "import mailtls_tasks, os; print(os.path.dirname(mailtls_tasks.__file__))"], cwd=installed)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(installed / "opt")), where


@pytest.mark.integration
def test_check_config_worker_on_the_example_with_keys_made_as_the_readme_says(installed: Path, tmp_path: Path) -> None:
    mailtls = str(installed / "bin" / "mailtls")
    etc = tmp_path / "etc-mailtls"
    etc.mkdir(mode=0o700)
    state = tmp_path / "state"
    text = (REPO / "workers" / "targets.example.toml").read_text()
    text = text.replace("/etc/mailtls/", f"{etc}/").replace('"/var/lib/mailtls"', f'"{state}"')
    cfg = etc / "targets.toml"
    cfg.write_text(text)

    # Not yet: no [security] section, and the message says how to make one.
    before = _run([mailtls, "check-config", "--worker", "--config", str(cfg)])
    assert before.returncode == 1, before
    assert "no [security] section" in before.stderr and "mailtls keys init-host" in before.stderr

    # The keys, as the README says; relative --out under a umask that would let anyone
    # read: printed as absolute paths (what the config accepts), created 0600 anyway.
    host = _run([mailtls, "keys", "init-host", "--out", "host.key"], cwd=etc, umask=0)
    pipe = _run([mailtls, "keys", "init-pipeline", "--out", "pipeline.key"], cwd=etc, umask=0)
    assert host.returncode == 0 and pipe.returncode == 0, (host.stderr, pipe.stderr)
    assert f"created {etc}/host.key (0600)" in host.stdout
    assert f'host_keys = ["{etc}/host.key"]' in host.stdout
    for key in ("host.key", "pipeline.key"):
        assert (etc / key).stat().st_mode & 0o777 == 0o600
    signer = re.search(r'trusted_signers = \["(ed25519:[^"]+)"\]', pipe.stdout).group(1)  # type: ignore[union-attr]

    # Uncomment the stub and fill in the printed values, as its comment says.
    lines = []
    for line in text.splitlines():
        if line.startswith(("# [security]", "# host_keys", "# trusted_signers", "# max_envelope_age")):
            line = line[2:]
        lines.append(line.replace("ed25519:PASTE-THE-PIPELINE-PUBLIC-KEY", signer))
    cfg.write_text("\n".join(lines) + "\n")
    ok = _run([mailtls, "check-config", "--worker", "--config", str(cfg)])
    assert ok.returncode == 0, ok.stderr
    assert "[smtp]" in ok.stdout and "[imap]" in ok.stdout

    # A key that others can read, or a state_dir open to them: the worker would refuse,
    # and check-config --worker says so first.
    os.chmod(etc / "host.key", 0o644)
    bad = _run([mailtls, "check-config", "--worker", "--config", str(cfg)])
    assert bad.returncode == 1 and "host.key" in bad.stderr and "0644" in bad.stderr, bad.stderr
    os.chmod(etc / "host.key", 0o600)
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    bad = _run([mailtls, "check-config", "--worker", "--config", str(cfg)])
    assert bad.returncode == 1 and "state_dir" in bad.stderr and "chmod 0700" in bad.stderr, bad.stderr
