"""SNI targets on real daemons: Postfix with ``tls_server_sni_maps`` (lmdb and hash,
built with ``postmap -F``) and Dovecot with ``local_name`` blocks.

Every name is checked with an independent client, ``openssl s_client -servername``,
besides the product's own probe: the new leaf for the names deployed, the old one for
every other name, the default certificate (no SNI) untouched unless the target is the
default. The compiled table is checked byte for byte after a rollback, and its owner
and mode after a deploy (it holds every private key of the table).
"""

from __future__ import annotations

import grp
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.core.config import load_config
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.local import run_local
from tests.support.daemons import Dovecot, Postfix
from tests.support.pki import PKI, Issued
from tests.support.services import require
from tests.support.stack import Wrapper

pytestmark = pytest.mark.e2e

# target -> (SNI names, Postfix map keys)
SNI_TARGETS = {
    "a": (["a.example.test"], ["a.example.test"]),
    "b": (["b.example.test", "*.b.example.test"], ["b.example.test", ".b.example.test"]),
    "c": (["c.example.test"], ["c.example.test"]),
}
DEFAULT_NAME = "mx.example.test"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def s_client(port: int, starttls: str | None, servername: str | None) -> str:
    """The leaf's SHA-256 as ``openssl s_client`` sees it: an independent client."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-verify_quiet"]
    argv += ["-starttls", starttls] if starttls else []
    argv += ["-servername", servername] if servername else ["-noservername"]
    res = subprocess.run(argv, input=b"", capture_output=True, timeout=30, check=False)
    pem = res.stdout[res.stdout.find(b"-----BEGIN CERTIFICATE-----"):res.stdout.find(b"-----END CERTIFICATE-----")
                     + len(b"-----END CERTIFICATE-----")]
    assert pem, f"s_client {port} {servername}: no certificate\n{res.stderr.decode(errors='replace')[-800:]}"
    der = subprocess.run(["openssl", "x509", "-outform", "DER"], input=pem, capture_output=True,
                         check=True).stdout
    return hashlib.sha256(der).hexdigest()


class SniHost:
    """One Postfix serving four certificates by SNI from one table (and the default
    certificate without SNI), one Dovecot serving two by local_name, one targets file."""

    def __init__(self, root: Path, pki: PKI, table_type: str) -> None:
        self.root, self.pki, self.table_type = root, pki, table_type
        self.postmap = require("postmap")
        self.current: dict[str, Issued] = {}
        certs = root / "certs"
        for name, (names, _) in {**SNI_TARGETS, "default": ([DEFAULT_NAME], [DEFAULT_NAME])}.items():
            self.write(name, pki.leaf(names[0], sans=[n for n in names]), certs / name)
        self.dv_current = {n: pki.leaf(n) for n in ("a.example.test", "c.example.test")}
        for n, leaf in self.dv_current.items():
            self._write_files(certs / f"dv-{n}", leaf)
        self.dv_default = pki.leaf("imap.example.test")
        self._write_files(certs / "dv-default", self.dv_default)
        self.source = root / "postfix-sni" / "sni"
        self.source.parent.mkdir()
        lines = [f"{key} {certs / name / 'key.pem'}, {certs / name / 'fullchain.pem'}"
                 for name, (_, keys) in {**SNI_TARGETS, "default": ([], [DEFAULT_NAME])}.items() for key in keys]
        self.source.write_text("# the SNI table: key first, then the chain\n" + "\n".join(lines) + "\n")
        self.spec = f"{table_type}:{self.source}"
        self.postfix = Postfix(root, certs / "default" / "fullchain.pem", certs / "default" / "key.pem",
                               extra_main=f"tls_server_sni_maps = {self.spec}")
        suffix = {"lmdb": ".lmdb", "hash": ".db"}.get(table_type)
        self.compiled = Path(str(self.source) + suffix) if suffix else None
        if self.compiled:
            subprocess.run([self.postmap, "-c", str(self.postfix.dir), "-F", self.spec], check=True)
            os.chmod(self.compiled, 0o600)
        self.dovecot = Dovecot(root, certs / "dv-default" / "cert.pem", certs / "dv-default" / "key.pem",
                               local_names={n: (certs / f"dv-{n}" / "cert.pem", certs / f"dv-{n}" / "key.pem")
                                            for n in self.dv_current})
        bin_dir = root / "bin"
        bin_dir.mkdir()
        self.pf_reload = Wrapper(bin_dir, "postfix-reload", self.postfix.command("reload"))
        self.pf_check = Wrapper(bin_dir, "postfix-check", self.postfix.command("check"))
        self.dv_reload = Wrapper(bin_dir, "dovecot-reload", self.dovecot.reload_command())
        self.dv_check = Wrapper(bin_dir, "dovecot-check", self.dovecot.validate_command())
        self.config = root / "targets.toml"
        self.config.write_text(self._targets())
        self.postfix.start()
        self.dovecot.start()

    def _write_files(self, d: Path, leaf: Issued) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "cert.pem").write_bytes(leaf.fullchain_pem)
        (d / "key.pem").write_bytes(leaf.key_pem)
        os.chmod(d / "key.pem", 0o600)

    def write(self, name: str, leaf: Issued, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "fullchain.pem").write_bytes(leaf.fullchain_pem)
        (d / "key.pem").write_bytes(leaf.key_pem)
        os.chmod(d / "key.pem", 0o600)
        self.current[name] = leaf

    def _targets(self) -> str:
        certs, pf, dv = self.root / "certs", self.postfix, self.dovecot
        verify_pf = (f'post_deploy_verify = {{ enabled = true, timeout = "8s", endpoints = ['
                     f'{{ endpoint = "127.0.0.1:{pf.smtp_port}", protocol = "smtp" }}, '
                     f'{{ endpoint = "127.0.0.1:{pf.smtps_port}", protocol = "smtps" }}] }}')
        verify_dv = (f'post_deploy_verify = {{ enabled = true, timeout = "8s", endpoints = ['
                     f'{{ endpoint = "127.0.0.1:{dv.ports["imaps"]}", protocol = "imaps" }}, '
                     f'{{ endpoint = "127.0.0.1:{dv.ports["pop3"]}", protocol = "pop3" }}] }}')
        out = [f'host = "sni-host"\nstate_dir = "{self.root / "state"}"\n']
        for name, (names, _) in {**SNI_TARGETS, "default": ([DEFAULT_NAME], [])}.items():
            default = ", default = true" if name == "default" else ""
            out.append(f"""
[targets.pf-{name}]
mode = "postfix"
instance = "{pf.dir}"
cert_path = "{certs / name / 'fullchain.pem'}"
key_path = "{certs / name / 'key.pem'}"
names = {names!r}
sni = {{ map = "{self.spec}"{default} }}
reload_command = "{self.pf_reload.path}"
validate_command = "{self.pf_check.path}"
trust_anchors = "{self.root / 'ca.pem'}"
{verify_pf}
""".replace("'", '"'))
        for n in self.dv_current:
            out.append(f"""
[targets.dv-{n.split('.')[0]}]
mode = "dovecot"
instance = "{dv.conf}"
cert_path = "{certs / f'dv-{n}' / 'cert.pem'}"
key_path = "{certs / f'dv-{n}' / 'key.pem'}"
names = ["{n}"]
sni = {{}}
reload_command = "{self.dv_reload.path}"
validate_command = "{self.dv_check.path}"
trust_anchors = "{self.root / 'ca.pem'}"
{verify_dv}
""")
        (self.root / "ca.pem").write_bytes(self.pki.root.cert_pem)
        return "".join(out)

    def deploy(self, target: str, leaf: Issued) -> object:
        return run_local(load_config(str(self.config)), target, leaf.fullchain_pem, leaf.key_pem)

    def smtp(self, servername: str | None) -> str:
        return s_client(self.postfix.smtp_port, "smtp", servername)

    def smtps(self, servername: str | None) -> str:
        return s_client(self.postfix.smtps_port, None, servername)

    def table_value(self, key: str) -> bytes:
        return subprocess.run([self.postmap, "-c", str(self.postfix.dir), "-Fq", key, self.spec],
                              capture_output=True, check=True).stdout

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.stop()


@pytest.fixture(scope="module", params=["lmdb", "hash"])
def sni_host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[SniHost]:
    h = SniHost(tmp_path_factory.mktemp(f"sni-{request.param}"), pki, request.param)
    try:
        yield h
    finally:
        h.stop()


def names_served(h: SniHost) -> dict[str | None, str]:
    """What s_client sees on the SMTP (STARTTLS) listener for every name, and without SNI."""
    names: list[str | None] = [None, DEFAULT_NAME, "a.example.test", "b.example.test", "deep.b.example.test",
                               "c.example.test", "unknown.example.test"]
    return {n: h.smtp(n) for n in names}


def test_one_sni_name_is_deployed_and_every_other_name_keeps_its_pair(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    # key files readable by a group (as Debian's ssl-cert): the table that holds them takes
    # their owner and mode -- not postmap's 0600, nor its source's
    for name in ("a", "b", "c", "default"):
        os.chown(h.root / "certs" / name / "key.pem", 0, grp.getgrnam("postfix").gr_gid)
        os.chmod(h.root / "certs" / name / "key.pem", 0o640)
    key_file = h.root / "certs" / "a" / "key.pem"
    before = names_served(h)
    assert before["a.example.test"] == h.current["a"].fingerprint  # the table is live, by SNI
    assert before[None] == before["unknown.example.test"] == h.current["default"].fingerprint
    new = pki.leaf("a.example.test")
    res = h.deploy("pf-a", new)
    assert res.outcome == "deployed", res  # type: ignore[attr-defined]
    after = names_served(h)
    assert after["a.example.test"] == h.smtps("a.example.test") == new.fingerprint
    assert {n: fp for n, fp in after.items() if n != "a.example.test"} == \
        {n: fp for n, fp in before.items() if n != "a.example.test"}
    # the table holds the new pair for a.example.test, built from the files now live
    value = h.table_value("a.example.test")
    assert new.key_pem.strip() in value and new.cert_pem.strip() in value
    # it holds every private key of the table: the key file's owner and mode, never wider
    assert h.compiled
    key_st, map_st = key_file.stat(), h.compiled.stat()
    assert stat.S_IMODE(map_st.st_mode) == stat.S_IMODE(key_st.st_mode) == 0o640
    assert (map_st.st_uid, map_st.st_gid) == (key_st.st_uid, key_st.st_gid) == (0, grp.getgrnam("postfix").gr_gid)
    # nothing of ours left beside the table
    assert sorted(p.name for p in h.source.parent.iterdir()) == sorted(["sni", h.compiled.name])
    h.current["a"] = new


def test_a_wildcard_entry_is_verified_below_its_domain(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    # one key of the table back to root's 0600: the table holds it, so it is no wider
    os.chown(h.root / "certs" / "c" / "key.pem", 0, 0)
    os.chmod(h.root / "certs" / "c" / "key.pem", 0o600)
    new = pki.leaf("b.example.test", sans=["b.example.test", "*.b.example.test"])
    res = h.deploy("pf-b", new)
    assert res.outcome == "deployed", res  # type: ignore[attr-defined]
    assert h.compiled
    table = h.compiled.stat()
    assert (stat.S_IMODE(table.st_mode), table.st_uid, table.st_gid) == (0o600, 0, 0)
    assert h.smtp("b.example.test") == h.smtp("deep.b.example.test") == new.fingerprint
    assert h.smtp(None) == h.current["default"].fingerprint
    h.current["b"] = new


def test_the_default_target_changes_the_default_and_its_own_entry(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    new = pki.leaf(DEFAULT_NAME)
    res = h.deploy("pf-default", new)
    assert res.outcome == "deployed", res  # type: ignore[attr-defined]
    assert h.smtp(None) == h.smtp("unknown.example.test") == h.smtp(DEFAULT_NAME) == new.fingerprint
    assert h.smtp("a.example.test") == h.current["a"].fingerprint
    h.current["default"] = new


def test_a_failed_reload_restores_the_table_and_files_byte_exact(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    assert h.compiled
    files = [h.compiled, h.source, h.root / "certs" / "c" / "key.pem", h.root / "certs" / "c" / "fullchain.pem"]
    before = {f: (sha(f), stat.S_IMODE(f.stat().st_mode), f.stat().st_ino) for f in files}
    # (a reload that only pretends is no failure here: each new smtpd opens the renamed table)
    h.pf_reload.fail_once()
    res = h.deploy("pf-c", pki.leaf("c.example.test"))
    assert res.outcome == "rolled_back", res  # type: ignore[attr-defined]
    assert {f: v[:2] for f, v in before.items()} == {f: (sha(f), stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert h.smtp("c.example.test") == h.current["c"].fingerprint


def test_a_stale_table_is_not_rebuilt_behind_the_operators_back(sni_host: SniHost, pki: PKI) -> None:
    """c's files replaced by hand, the table never rebuilt: a deploy of a must not start
    serving c's new files. Rejected, nothing changed."""
    h = sni_host
    assert h.compiled
    c_dir = h.root / "certs" / "c"
    saved = {p: p.read_bytes() for p in c_dir.iterdir()}
    h.write("c-by-hand", pki.leaf("c.example.test"), c_dir)
    table = sha(h.compiled)
    try:
        res = h.deploy("pf-a", pki.leaf("a.example.test"))
        assert res.outcome == "rejected", res  # type: ignore[attr-defined]
        assert "c.example.test" in (res.error or "") and "older than" in (res.error or "")  # type: ignore[attr-defined]
        assert sha(h.compiled) == table
        assert h.smtp("a.example.test") == h.current["a"].fingerprint
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_names_the_table_does_not_give_this_target_are_refused(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    cfg = h.config.read_text()
    bad = h.root / "targets-bad.toml"
    bad.write_text(cfg.replace('names = ["c.example.test"]', 'names = ["c.example.test", "a.example.test"]'))
    leaf = pki.leaf("c.example.test", sans=["c.example.test", "a.example.test"])
    assert h.compiled
    table = sha(h.compiled)
    res = run_local(load_config(str(bad)), "pf-c", leaf.fullchain_pem, leaf.key_pem)
    assert res.outcome == "rejected" and res.reason == "sni_map", res
    assert "a.example.test names other files" in (res.error or "")
    assert sha(h.compiled) == table


def test_dovecot_local_name_is_deployed_by_its_name(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    imaps, pop3 = h.dovecot.ports["imaps"], h.dovecot.ports["pop3"]
    new = pki.leaf("a.example.test")
    res = h.deploy("dv-a", new)
    assert res.outcome == "deployed", res  # type: ignore[attr-defined]
    assert s_client(imaps, None, "a.example.test") == s_client(pop3, "pop3", "a.example.test") == new.fingerprint
    assert s_client(imaps, None, "c.example.test") == h.dv_current["c.example.test"].fingerprint
    assert s_client(imaps, None, None) == h.dv_default.fingerprint
    h.dv_current["a.example.test"] = new


def test_discover_proposes_a_target_per_sni_file_set_and_check_config_knows_them(sni_host: SniHost) -> None:
    """From the daemons' own configuration: each table entry's files (grouped), each
    local_name block, the default certificate marked as such; the proposal loads as a
    targets file; the cross-check counts SNI files as read and names one left uncovered."""
    import tomllib

    from mailtls_tasks.core import discover
    from mailtls_tasks.core.config import parse_config

    h = sni_host
    found = discover.read("postfix", str(h.postfix.dir)) + discover.read("dovecot", str(h.dovecot.conf))
    proposed = tomllib.loads(discover.render(found, "sni-host"))
    targets = proposed["targets"]
    by_names = {tuple(t.get("names", [])): t for t in targets.values()}
    assert by_names[("b.example.test", "*.b.example.test")]["sni"] == {"map": h.spec}
    assert by_names[("b.example.test", "*.b.example.test")]["key_path"] == str(h.root / "certs" / "b" / "key.pem")
    assert targets["postfix"]["sni"] == {"map": h.spec, "default": True}
    assert targets["postfix"]["names"] == [DEFAULT_NAME]
    dovecot_sni = [t for t in targets.values() if t["mode"] == "dovecot" and "sni" in t]
    assert sorted(t["names"][0] for t in dovecot_sni) == ["a.example.test", "c.example.test"]
    parse_config(proposed, "<proposed>")  # a targets file that loads

    cfg = load_config(str(h.config))
    warnings = discover.cross_check(cfg)
    assert not [w for w in warnings if "pf-" in w or "does not read" in w], warnings
    without_c = cfg.model_copy(update={"targets": {n: t for n, t in cfg.targets.items() if n != "pf-c"}})
    uncovered = [w for w in discover.cross_check(without_c) if "by SNI for c.example.test" in w]
    assert len(uncovered) == 1 and "no target covers" in uncovered[0], warnings


def test_a_texthash_table_needs_only_its_files_swapped(tmp_path: Path, pki: PKI) -> None:
    """texthash: smtpd reads the files its entries name when it opens the table: no
    compiled file, nothing of the deploy's beside the source."""
    h = SniHost(tmp_path, pki, "texthash")
    try:
        source = h.source.read_bytes()
        new = pki.leaf("a.example.test")
        res = h.deploy("pf-a", new)
        assert res.outcome == "deployed", res  # type: ignore[attr-defined]
        assert h.smtp("a.example.test") == h.smtps("a.example.test") == new.fingerprint
        assert h.smtp("c.example.test") == h.current["c"].fingerprint
        assert h.smtp(None) == h.current["default"].fingerprint
        assert h.source.read_bytes() == source and sorted(p.name for p in h.source.parent.iterdir()) == ["sni"]
        rec = Journal(str(h.root / "state")).load("pf-a", res.deploy_id)  # type: ignore[attr-defined]
        assert rec is not None and [e.role for e in rec.files] == ["key", "cert"]  # no table among its files
    finally:
        h.stop()
