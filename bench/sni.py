"""``make bench-sni``: what SNI hosts cost, side by side in one run, on a real private
Postfix (one lmdb ``tls_server_sni_maps`` table) and Dovecot (``local_name`` blocks).

S1  one renewal (``mailtls deploy --local``, verify on, a fresh certificate each round)
    on a host serving 1,000 SNI names against the same renewal on a host serving 10,
    interleaved round by round. Goal: <= 1.5x.
S2  a batch of 100 renewals on the 1,000-name host (50 Postfix names, 50 Dovecot names,
    ``mailtls deploy --local --batch``): exactly one reload per daemon, and the batch
    <= 5x one single deploy there; and, measured in the same run, the same 100 as 100
    separate deploys.
S3  a worker's memory (main process and pool child, PSS) with the 1,000-name targets
    file: <= 90 MiB.

    python -m bench.sni [--rounds 5] [--names 1000] [--out bench-sni-report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.daemons import Dovecot, Postfix
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued, make_pki
from tests.support.services import REPO, RedisServer, Worker, require
from tests.support.stack import Wrapper


def _name(i: int) -> str:
    return f"d{i}.example.test"


class SniBenchHost:
    """N SNI names, each with files of its own, served by Postfix (all N, one table) and
    Dovecot (the first ``dovecot_names``, a local_name block each); a target per name
    and daemon."""

    def __init__(self, root: Path, pki: PKI, n: int, dovecot_names: int, pipeline: Pipeline) -> None:
        self.root, self.n = root, n
        certs = root / "certs"
        self.leaves: dict[str, Issued] = {}
        lines = []
        shared = pki.leaf("bench")  # one key for speed: each name still has files of its own
        for i in range(n):
            d = certs / f"pf-{i}"
            d.mkdir(parents=True)
            leaf = pki.leaf(_name(i), key=shared.key)
            (d / "fullchain.pem").write_bytes(leaf.fullchain_pem)
            (d / "key.pem").write_bytes(leaf.key_pem)
            os.chmod(d / "key.pem", 0o600)
            lines.append(f"{_name(i)} {d / 'key.pem'}, {d / 'fullchain.pem'}\n")
        tables = root / "tables"
        tables.mkdir()
        self.source = tables / "sni"
        self.source.write_text("".join(lines))
        spec = f"lmdb:{self.source}"
        default = pki.leaf("mx.example.test")
        (certs / "default.pem").write_bytes(default.key_pem + default.fullchain_pem)
        os.chmod(certs / "default.pem", 0o600)
        self.postfix = Postfix(root, certs / "default.pem", certs / "default.pem",
                               chain_files=[certs / "default.pem"], extra_main=f"tls_server_sni_maps = {spec}")
        subprocess.run([require("postmap"), "-c", str(self.postfix.dir), "-F", spec], check=True)
        os.chmod(Path(f"{self.source}.lmdb"), 0o600)
        dv_names = {}
        for i in range(dovecot_names):
            d = certs / f"dv-{i}"
            d.mkdir()
            leaf = pki.leaf(_name(i), key=shared.key)
            (d / "cert.pem").write_bytes(leaf.fullchain_pem)
            (d / "key.pem").write_bytes(leaf.key_pem)
            os.chmod(d / "key.pem", 0o600)
            dv_names[_name(i)] = (d / "cert.pem", d / "key.pem")
        (certs / "dv-default").mkdir()
        (certs / "dv-default" / "cert.pem").write_bytes(default.fullchain_pem)
        (certs / "dv-default" / "key.pem").write_bytes(default.key_pem)
        self.dovecot = Dovecot(root, certs / "dv-default" / "cert.pem", certs / "dv-default" / "key.pem",
                               local_names=dv_names)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        self.pf_reload = Wrapper(bin_dir, "postfix-reload", self.postfix.command("reload"))
        self.dv_reload = Wrapper(bin_dir, "dovecot-reload", self.dovecot.reload_command())
        pf_verify = {"enabled": True, "timeout": "20s", "interval": 0.02,
                     "endpoints": [{"endpoint": f"127.0.0.1:{self.postfix.smtp_port}", "protocol": "smtp"}]}
        dv_verify = {"enabled": True, "timeout": "20s", "interval": 0.02,
                     "endpoints": [{"endpoint": f"127.0.0.1:{self.dovecot.ports['imaps']}", "protocol": "imaps"}]}
        targets: dict[str, Any] = {}
        for i in range(n):
            targets[f"pf-{i}"] = {"mode": "postfix", "instance": str(self.postfix.dir),
                                  "cert_path": str(certs / f"pf-{i}" / "fullchain.pem"),
                                  "key_path": str(certs / f"pf-{i}" / "key.pem"), "names": [_name(i)],
                                  "sni": {"map": spec}, "reload_command": str(self.pf_reload.path),
                                  "validate_command": self.postfix.command("check"), "post_deploy_verify": pf_verify}
        for i in range(dovecot_names):
            targets[f"dv-{i}"] = {"mode": "dovecot", "instance": str(self.dovecot.conf),
                                  "cert_path": str(certs / f"dv-{i}" / "cert.pem"),
                                  "key_path": str(certs / f"dv-{i}" / "key.pem"), "names": [_name(i)], "sni": {},
                                  "reload_command": str(self.dv_reload.path),
                                  "validate_command": self.dovecot.validate_command(),
                                  "post_deploy_verify": dv_verify}
        security = pipeline.enroll(f"sni-{n}", root / "keys")
        self.config = root / "targets.json"
        self.config.write_text(json.dumps({"host": f"sni-{n}", "state_dir": str(root / "state"),
                                           "targets": targets, "security": security}))
        self.postfix.start()
        self.dovecot.start()

    def env(self) -> dict[str, str]:
        return {**os.environ, "MAILTLS_CONFIG": str(self.config), "PYTHONPATH": str(REPO)}

    def cli(self, *args: str) -> float:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args], env=self.env(), capture_output=True,
                           text=True, timeout=900)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{args[:3]} exited {p.returncode}: {p.stdout[-1500:]}{p.stderr[-1500:]}")
        return dt

    def deploy(self, target: str, leaf: Issued) -> float:
        c, k = self.root / "new.crt", self.root / "new.key"
        c.write_bytes(leaf.fullchain_pem)
        k.write_bytes(leaf.key_pem)
        return self.cli("deploy", target, "--local", "--cert", str(c), "--key", str(k))

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sni")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", default="bench-sni-report.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailtls-bench-sni-"))
    os.chmod(root, 0o755)  # the postfix and dovecot users traverse it
    pki = make_pki("ec")
    pipeline = Pipeline(root / "pipeline")
    half = args.batch // 2
    small = SniBenchHost(root / "small", pki, 10, 10, pipeline)
    big = SniBenchHost(root / "big", pki, args.names, half, pipeline)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}",
                              "names": args.names, "rounds": args.rounds}
    try:
        times: dict[str, list[float]] = {"small": [], "big": []}
        for i in range(args.rounds):
            for which in (("small", "big") if i % 2 == 0 else ("big", "small")):
                host = small if which == "small" else big
                times[which].append(host.deploy("pf-1", pki.leaf(_name(1))))
        single = {k: statistics.median(v) for k, v in times.items()}
        # S2: the batch, then the same members one by one
        batch_dir = root / "batch"
        members = [f"pf-{i}" for i in range(2, 2 + args.batch - half)] + [f"dv-{i}" for i in range(half)]
        for t in members:
            d = batch_dir / t
            d.mkdir(parents=True)
            leaf = pki.leaf(_name(int(t.split("-")[1])))
            (d / "fullchain.pem").write_bytes(leaf.fullchain_pem)
            (d / "privkey.pem").write_bytes(leaf.key_pem)
        reloads = (big.pf_reload.calls, big.dv_reload.calls)
        batch_s = big.cli("deploy", "--local", "--batch", str(batch_dir))
        batch_reloads = (big.pf_reload.calls - reloads[0], big.dv_reload.calls - reloads[1])
        t0 = time.perf_counter()
        for t in members:
            big.deploy(t, pki.leaf(_name(int(t.split("-")[1]))))
        separate_s = time.perf_counter() - t0
        # S3: a worker with the big host's targets file
        r = RedisServer(root / "redis")
        worker = Worker(big.config, r.url, root / "worker.log")
        try:
            time.sleep(3)  # registered and idle
            assert worker.proc is not None
            pss = _pss(worker.proc.pid)
            # one renewal through the worker, as a pipeline sends it: the batch's yardstick there
            wenv = {**os.environ, "PYTHONPATH": str(REPO), "MAILTLS_PIPELINE": str(pipeline.path)}
            worker_single = []
            for _ in range(3):
                c, k = root / "w.crt", root / "w.key"
                leaf = pki.leaf(_name(1))
                c.write_bytes(leaf.fullchain_pem)
                k.write_bytes(leaf.key_pem)
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "pf-1", "--cert", str(c),
                                    "--key", str(k), "--broker", r.url], capture_output=True, text=True, timeout=300,
                                   env=wenv)
                worker_single.append(time.perf_counter() - t0)
                if p.returncode != 0:
                    raise RuntimeError(f"deploy through the worker exited {p.returncode}: {p.stdout}{p.stderr}")
            worker_one = statistics.median(worker_single)
            # S2 through the worker: the same batch (new leaves) as `deploy --batch` from a pipeline
            for t in members:
                leaf = pki.leaf(_name(int(t.split("-")[1])))
                (batch_dir / t / "fullchain.pem").write_bytes(leaf.fullchain_pem)
                (batch_dir / t / "privkey.pem").write_bytes(leaf.key_pem)
            reloads = (big.pf_reload.calls, big.dv_reload.calls)
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "--batch", str(batch_dir),
                                "--broker", r.url, "--json"], capture_output=True, text=True, timeout=900, env=wenv)
            worker_batch_s = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(f"deploy --batch through the worker exited {p.returncode}: {p.stdout[-1500:]}"
                                   f"{p.stderr[-1500:]}")
            worker_reloads = (big.pf_reload.calls - reloads[0], big.dv_reload.calls - reloads[1])
        finally:
            worker.stop()
            r.stop()
    finally:
        small.stop()
        big.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.update({"single_s": single, "batch_s": batch_s, "batch_members": len(members),
                   "batch_reloads": {"postfix": batch_reloads[0], "dovecot": batch_reloads[1]},
                   "separate_s": separate_s, "worker_pss_mib": pss, "worker_batch_s": worker_batch_s,
                   "worker_single_s": worker_one,
                   "worker_batch_reloads": {"postfix": worker_reloads[0], "dovecot": worker_reloads[1]}})
    goals = {
        f"S1 one renewal, {args.names} names / 10 names <= 1.5": (single["big"] / single["small"], 1.5),
        f"S2 batch of {len(members)} / one deploy <= 5": (batch_s / single["big"], 5.0),
        "S2 reloads per daemon in the batch == 1": (float(max(batch_reloads)), 1.0),
        f"S2 batch of {len(members)} through the worker / one deploy through it <= 5": (worker_batch_s / worker_one,
                                                                                         5.0),
        "S2 reloads per daemon in the worker's batch == 1": (float(max(worker_reloads)), 1.0),
        f"S3 worker PSS MiB, {args.names} names <= 90": (pss, 90.0),
    }
    lowest = {"S2 reloads per daemon in the batch == 1": min(batch_reloads),
              "S2 reloads per daemon in the worker's batch == 1": min(worker_reloads)}
    report["goals"] = {k: {"value": round(v, 3), "limit": lim, "met": v <= lim and lowest.get(k, 1) == 1}
                       for k, (v, lim) in goals.items()}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"machine: {report['machine']}; {args.rounds} rounds; medians")
    print(f"  one renewal: 10 names {single['small']:.3f} s, {args.names} names {single['big']:.3f} s "
          f"({single['big'] / single['small']:.2f}x)")
    print(f"  batch of {len(members)} ({len(members) - half} Postfix, {half} Dovecot names): {batch_s:.2f} s = "
          f"{batch_s / single['big']:.2f}x one deploy; reloads postfix {batch_reloads[0]}, dovecot "
          f"{batch_reloads[1]}; the same {len(members)} as separate deploys: {separate_s:.1f} s "
          f"(the batch is {batch_s / separate_s:.3f}x of it)")
    print(f"  through the worker, as a pipeline sends them: one renewal {worker_one:.3f} s; the batch "
          f"(deploy --batch) {worker_batch_s:.2f} s = {worker_batch_s / worker_one:.2f}x one renewal there "
          f"({worker_batch_s / single['big']:.2f}x one --local); reloads postfix {worker_reloads[0]}, dovecot "
          f"{worker_reloads[1]}")
    print(f"  worker PSS (main + pool), {args.names + half} targets: {pss:.1f} MiB")
    print("goals:")
    for k, g in report["goals"].items():
        print(f"  {'MET ' if g['met'] else 'MISS'} {k}: {g['value']}")
    print(f"written: {args.out}")
    return 0 if all(g["met"] for g in report["goals"].values()) else 1


def _pss(pid: int) -> float:
    from bench.__main__ import _pss_mib

    return _pss_mib(pid)


if __name__ == "__main__":
    sys.exit(main())
