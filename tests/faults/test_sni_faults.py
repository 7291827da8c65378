"""Crashes while an SNI table is built and renamed, on a real Postfix.

A ``mailtls deploy --local`` of one SNI name of an ``lmdb:`` table is SIGKILLed at the
N-th ``rename`` or ``fsync`` of any of its processes (postmap included: strace -f),
then ``mailtls recover`` runs, as after a reboot. After each case, for every name of
the table: its entry holds a key and certificate that match, the old pair or the new
one for the name deployed and the very bytes it held before for every other name;
the target's files are that same pair; Postfix serves, by SNI, the leaf the table
holds; the deploy has ended, and nothing of ours is left beside the files or the table.

``make test`` kills at every rename and fsync that touches the targets' files or the
table (the staged files, the temp source, the built table, the renames, the fsyncs
of their directories) or writes a batch's decision, and one before the first and
after the last: where a crash could leave a name
with a half-built table or one file of its pair. ``MAILTLS_FAULTS=full`` kills at
every N of the whole deploy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import fingerprint, key_chains, key_matches_cert, leaf_of_file
from mailtls_tasks.daemons.postfix_sni import dump, parse_map
from tests.support.daemons import Postfix
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, require

pytestmark = pytest.mark.e2e

LEVEL = os.environ.get("MAILTLS_FAULTS", "slice")
NAMES = {"a": "a.example.test", "b": "b.example.test", "c": "c.example.test"}


class SniFaultHost:
    def __init__(self, root: Path, pki: PKI) -> None:
        self.root = root
        self.postmap = require("postmap")
        certs = root / "certs"
        self.leaves: dict[str, Issued] = {}
        for short, name in NAMES.items():
            d = certs / short
            d.mkdir(parents=True)
            self.leaves[short] = leaf = pki.leaf(name)
            (d / "fullchain.pem").write_bytes(leaf.fullchain_pem)
            (d / "key.pem").write_bytes(leaf.key_pem)
            os.chmod(d / "key.pem", 0o600)
        self.old, self.new = self.leaves["a"], pki.leaf(NAMES["a"])
        (root / "new-cert.pem").write_bytes(self.new.fullchain_pem)
        (root / "new-key.pem").write_bytes(self.new.key_pem)
        # a batch of a and c, in certbot's live/ layout
        self.news = {"a": self.new, "c": pki.leaf(NAMES["c"])}
        self.batch = root / "batch"
        for short, leaf in self.news.items():
            (self.batch / f"pf-{short}").mkdir(parents=True)
            (self.batch / f"pf-{short}" / "fullchain.pem").write_bytes(leaf.fullchain_pem)
            (self.batch / f"pf-{short}" / "privkey.pem").write_bytes(leaf.key_pem)
        default = pki.leaf("mx.example.test")
        (certs / "default.pem").write_bytes(default.key_pem + default.fullchain_pem)
        os.chmod(certs / "default.pem", 0o600)
        self.tables = root / "tables"
        self.tables.mkdir()
        self.source = self.tables / "sni"
        self.source.write_text("".join(f"{n} {certs / s / 'key.pem'}, {certs / s / 'fullchain.pem'}\n"
                                       for s, n in NAMES.items()))
        self.spec = f"lmdb:{self.source}"
        self.compiled = Path(f"{self.source}.lmdb")
        self.postfix = Postfix(root, certs / "default.pem", certs / "default.pem", chain_files=[certs / "default.pem"],
                               extra_main=f"tls_server_sni_maps = {self.spec}")
        subprocess.run([self.postmap, "-c", str(self.postfix.dir), "-F", self.spec], check=True)
        os.chmod(self.compiled, 0o600)
        self.saved = {p: p.read_bytes() for p in [self.compiled, *certs.rglob("*.pem")]}
        self.state = root / "state"
        self.config = root / "targets.json"
        self.config.write_text(json.dumps({"host": "sni-faults", "state_dir": str(self.state), "targets": {
            f"pf-{short}": {
                "mode": "postfix", "instance": str(self.postfix.dir),
                "cert_path": str(certs / short / "fullchain.pem"), "key_path": str(certs / short / "key.pem"),
                "names": [NAMES[short]], "sni": {"map": self.spec},
                "reload_command": self.postfix.command("reload"), "validate_command": "", "command_timeout": 20,
                "post_deploy_verify": {"enabled": True, "endpoint": f"127.0.0.1:{self.postfix.smtps_port}",
                                       "protocol": "smtps", "timeout": 3.0, "interval": 0.1}}
            for short in ("a", "c")}}))
        self.postfix.start()

    def cli(self, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAILTLS_CONFIG": str(self.config), "PYTHONPATH": str(REPO)}
        return subprocess.run([*(prefix or []), sys.executable, "-m", "mailtls_tasks.cli", *args],
                              capture_output=True, text=True, env=env, cwd=self.root, timeout=120)

    def deploy_args(self, deploy_id: str, scenario: str = "single") -> list[str]:
        if scenario == "batch":
            return ["deploy", "--local", "--batch", str(self.batch), "--deploy-id", deploy_id, "--json"]
        return ["deploy", "pf-a", "--local", "--cert", str(self.root / "new-cert.pem"), "--key",
                str(self.root / "new-key.pem"), "--deploy-id", deploy_id, "--json"]

    def reset(self) -> None:
        """The files and the table as they were: written beside and renamed, as a deploy
        does, so that smtpd never opens a half-written table."""
        shutil.rmtree(self.state, ignore_errors=True)
        for p, data in self.saved.items():
            tmp = p.with_name(p.name + ".reset")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600 if p.name.endswith(("key.pem", ".lmdb", "default.pem")) else 0o644)
            os.replace(tmp, p)

    def table(self) -> dict[str, bytes]:
        return dump(parse_map(self.spec), str(self.source), str(self.postfix.dir), 30)

    def check(self, deploy_id: str, scenario: str = "single") -> tuple[str | None, str]:
        """The invariant, for every name of the table; returns (outcomes, old/new)."""
        deployed = ["a", "c"] if scenario == "batch" else ["a"]
        table = self.table()
        in_table = {}
        for short, name in NAMES.items():
            value = table.get(name)
            assert value is not None, f"{name}: no entry in the table"
            groups = key_chains(value)
            assert len(groups) == 1 and key_matches_cert(groups[0], groups[0]), f"{name}: a mismatched pair"
            in_table[short] = fingerprint(leaf_of_file(groups[0]))  # type: ignore[arg-type]
        for short in set(NAMES) - set(deployed):
            assert in_table[short] == self.leaves[short].fingerprint, f"{NAMES[short]} changed"
        j = Journal(str(self.state))
        lives, outcomes = set(), set()
        for short in deployed:
            old, new = self.leaves[short], self.news[short] if short in self.news else self.new
            live = {old.fingerprint: "old", new.fingerprint: "new"}.get(in_table[short])
            assert live, f"{NAMES[short]}: the table holds neither the old pair nor the new one"
            cert = (self.root / "certs" / short / "fullchain.pem").read_bytes()
            key = (self.root / "certs" / short / "key.pem").read_bytes()
            assert key_matches_cert(key, cert), f"{short}: the live key does not match the live cert"
            assert fingerprint(leaf_of_file(cert)) == in_table[short], \
                f"{short}: the files and the table hold different pairs"  # type: ignore[arg-type]
            rec = j.load(f"pf-{short}", deploy_id)
            if rec is not None:
                assert rec.finished, f"pf-{short} unfinished after recovery: {rec.phase}"
                expected = {"deployed": "new", "rolled_back": "old", "rejected": "old"}.get(rec.outcome or "")
                assert expected in (None, live), f"pf-{short}: outcome {rec.outcome} but the {live} pair is live"
                outcomes.add(rec.outcome)
            else:
                assert live == "old", f"pf-{short}: the new pair is live and the journal knows no deploy"
            lives.add(live)
        assert len(lives) == 1, f"the batch ended half new, half old: {lives}"  # no decision, no member new
        assert not j.owners(), "files still owned after recovery"
        strays = [p.name for d in (self.tables, *(self.root / "certs" / s for s in deployed)) for p in d.iterdir()
                  if ".mailtls-" in p.name]
        assert not strays, f"left beside the files: {strays}"
        for short, name in NAMES.items():
            served = probe.probe("127.0.0.1", self.postfix.smtps_port, "smtps", server_name=name, timeout=5)
            assert served.fingerprint == in_table[short], f"{name}: Postfix serves another leaf than its entry"
        return ",".join(sorted(o or "-" for o in outcomes)) or None, lives.pop()

    def close(self) -> None:
        self.postfix.stop()


def strace(syscall: str, n: int) -> list[str]:
    return [require("strace"), "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
            "-e", f"inject={syscall}:signal=KILL:when={n}"]


def calls(h: SniFaultHost, syscall: str, scenario: str) -> list[str]:
    """Each ``syscall`` a fault-free deploy makes, in order (all its processes)."""
    out = h.root / f"trace-{syscall}.txt"
    h.reset()
    res = h.cli(*h.deploy_args("count", scenario), prefix=[require("strace"), "-f", "-qq", "-y", "-o", str(out),
                                                           "-e", f"trace={syscall}"])
    assert res.returncode == 0, res.stdout + res.stderr
    return [ln for ln in out.read_text().splitlines() if f"{syscall}(" in ln and "resumed" not in ln]


@pytest.fixture(scope="module")
def sni_faults(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[SniFaultHost]:
    require("strace")
    h = SniFaultHost(tmp_path_factory.mktemp("sni-faults"), pki)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("scenario", ["single", "batch"])
@pytest.mark.parametrize("syscall", ["rename", "fsync"])
def test_a_crash_while_the_table_is_built_or_renamed_leaves_every_name_a_matching_pair(
        sni_faults: SniFaultHost, syscall: str, scenario: str) -> None:
    """single: one SNI name deployed; batch: two names of the table as one batch, which
    ends all new or all old."""
    h = sni_faults
    seen = calls(h, syscall, scenario)
    # the moments that touch the targets' files or the table (the staged files, the
    # temp source, the built table, the renames, the fsyncs of their directories), the
    # batch's decision, and one syscall before the first and after the last of them
    dirs = [str(h.tables), *(str(h.root / "certs" / s) for s in ("a", "c"))]
    touching = {i for i, ln in enumerate(seen, 1) if any(d in ln for d in dirs) or "batches" in ln}
    # the slice: every moment of the table and the batch's decision, every third of the
    # certificate files' own (the plain fault matrix sweeps those), and the borders
    table = {i for i in touching if str(h.tables) in seen[i - 1] or "batches" in seen[i - 1]}
    spread = set(sorted(touching - table)[::3])
    near = sorted({j for j in (*table, *spread, min(touching) - 1, max(touching) + 1) if 1 <= j <= len(seen)})
    points = range(1, len(seen) + 1) if LEVEL == "full" else near
    assert len(points) >= 3, (syscall, len(seen))  # a sweep over nothing proves nothing
    outcomes = []
    for n in points:
        h.reset()
        did = f"crash-{scenario}-{syscall}-{n}"
        h.cli(*h.deploy_args(did, scenario), prefix=strace(syscall, n))
        after = h.cli("recover")
        assert after.returncode in (0, 4), after.stdout + after.stderr
        try:
            outcomes.append(h.check(did, scenario))
        except AssertionError as err:
            raise AssertionError(f"killed at {syscall} #{n} of {len(seen)}: {err}") from None
    assert {live for _, live in outcomes} <= {"old", "new"}
