"""The journal's owner entries have a directory of their own (``owners/``), so that
finding the deploys in flight lists only them, not a lock and a fence file for every
file the host ever deployed. A state directory of the previous release (owner entries
as ``files/<K>.owner`` beside the locks and fences) is read on upgrade: its entries
are moved, and a deploy it left unfinished is recovered as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mailtls_tasks.core.journal import Journal, file_key
from mailtls_tasks.core.material import key_matches_cert
from tests.local.test_crash import CHILD, _assert_old_set_live_and_recorded, _env, _setup
from tests.support.host import MailHost
from tests.support.pki import PKI


def _as_previous_release(state: str) -> list[str]:
    """Rewrite the state directory's owner entries the way releases up to the SNI one
    kept them: ``files/<K>.owner``, JSON ``{"path", "target", "deploy_id"}``, next to
    ``<K>.lock`` and ``<K>.fence``, and no ``owners/``. Returns the real paths owned."""
    owners_dir = os.path.join(state, "owners")
    reals = []
    for name in os.listdir(owners_dir):
        path = os.path.join(owners_dir, name)
        if name.startswith("."):
            os.unlink(path)
            continue
        with open(path) as f:
            body = json.load(f)
        assert set(body) == {"path", "target", "deploy_id"}
        assert name == file_key(body["path"])
        os.rename(path, os.path.join(state, "files", f"{name}.owner"))
        reals.append(body["path"])
    os.rmdir(owners_dir)
    return reals


def test_owner_entries_live_apart_from_locks_and_fences(host: MailHost, pki: PKI) -> None:
    _setup(host, pki)
    p = subprocess.run([sys.executable, "-c", CHILD, "2", str(host.root / "new-cert.pem"),
                        str(host.root / "new-key.pem")], env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stdout + p.stderr
    j = Journal(str(host.state))
    owned = {o.path for o in j.owners()}
    assert owned == {os.path.realpath(host.path("mx", r)) for r in ("chain", "key", "cert")}
    assert not [n for n in os.listdir(host.state / "files") if n.endswith(".owner")]
    assert len(os.listdir(host.state / "owners")) == len(owned) + 1  # and the layout's marker


def test_a_previous_releases_journal_is_read_on_upgrade(host: MailHost, pki: PKI) -> None:
    """A deploy the previous release left half-committed (new key, old cert live) and
    its owners in the old place: the new release's recover finds it and rolls it back."""
    _setup(host, pki)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    p = subprocess.run([sys.executable, "-c", CHILD, "2", str(host.root / "new-cert.pem"),
                        str(host.root / "new-key.pem")], env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stdout + p.stderr
    assert not key_matches_cert(host.path("mx", "key").read_bytes(), host.path("mx", "cert").read_bytes())
    reals = _as_previous_release(str(host.state))
    assert len(reals) == 3

    # the file is owned for a deploy of the new release even before any recovery ran
    assert Journal(str(host.state)).owner_of(reals[0]) is not None

    r = host.cli("recover")

    assert r.returncode == 0, r.stderr
    assert "crashing-1 -> rolled_back (interrupted)" in r.stdout
    _assert_old_set_live_and_recorded(host, before)
    assert Journal(str(host.state)).owners() == []
    assert not [n for n in os.listdir(host.state / "files") if n.endswith(".owner")]


def test_two_threads_upgrading_one_journal_at_once_both_succeed(tmp_path: object) -> None:
    """Found by the batch interleaving test: the layout marker was written through a
    temp named by the pid alone, so two threads of one process (a worker's task and
    its recovery sweep) collided on it (ENOENT)."""
    import threading
    from pathlib import Path

    state = Path(str(tmp_path)) / "state"
    (state / "files").mkdir(parents=True)
    for i in range(200):
        real = f"/etc/x/{i}"
        (state / "files" / f"{file_key(real)}.owner").write_text(
            json.dumps({"path": real, "target": "t", "deploy_id": f"d-{i}"}))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def upgrade() -> None:
        barrier.wait()
        try:
            Journal(str(state)).owners()
        except BaseException as err:  # the test reports it
            errors.append(err)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(Journal(str(state)).owners()) == 200


def test_a_state_directory_removed_under_a_running_journal_is_made_again(tmp_path: object) -> None:
    """Found by the worker fault matrix: a worker's Journal remembered that owners/ was
    ready, its state directory was emptied (the operator's reset, here the harness's),
    and every later stage failed "cannot write owners/<K>: ENOENT" until a restart."""
    import shutil
    from pathlib import Path

    from mailtls_tasks.core.journal import DeployRecord

    state = Path(str(tmp_path)) / "state"
    j = Journal(str(state))
    assert j.owners() == []
    shutil.rmtree(state)
    j.set_owner("/etc/x/key.pem", DeployRecord(deploy_id="d-1", target="t"))
    assert [o.deploy_id for o in j.owners()] == ["d-1"]
