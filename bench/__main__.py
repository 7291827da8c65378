"""What does safety cost? A full in-process deploy (stage with backups and fsyncs,
OpenSSL handshake validation, atomic commit, reload, journal) against the naive way
(write the files in place, run the reload command), same machine, same real reload
executable, interleaved in one run. Prints medians and the ratio; also peak Python
memory of each (tracemalloc).

    make bench                 # 30 rounds
    python -m bench --rounds 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

from mailtls_tasks.core.config import parse_config
from mailtls_tasks.core.local import run_local
from tests.support.pki import make_pki


def naive(cert_path: Path, key_path: Path, cert: bytes, key: bytes, reload_cmd: str) -> None:
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    subprocess.run([reload_cmd], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailtls-bench-"))
    reload_cmd = root / "reload"
    reload_cmd.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(reload_cmd, 0o755)
    (root / "certs").mkdir()
    cfg = parse_config({"host": "bench", "state_dir": str(root / "state"), "targets": {"t": {
        "cert_path": str(root / "certs/cert.pem"), "key_path": str(root / "certs/key.pem"),
        "reload_command": str(reload_cmd), "validate_command": ""}}})
    pki = make_pki("ec")
    leaves = [pki.leaf() for _ in range(args.rounds * 2)]
    safe_t, naive_t, safe_mem, naive_mem = [], [], [], []
    for i in range(args.rounds):
        a, b = leaves[2 * i], leaves[2 * i + 1]
        tracemalloc.start()
        t0 = time.perf_counter()
        r = run_local(cfg, "t", a.fullchain_pem, a.key_pem)
        safe_t.append(time.perf_counter() - t0)
        safe_mem.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert r.outcome == "deployed", r.error
        tracemalloc.start()
        t0 = time.perf_counter()
        naive(root / "certs/naive-cert.pem", root / "certs/naive-key.pem", b.fullchain_pem, b.key_pem,
              str(reload_cmd))
        naive_t.append(time.perf_counter() - t0)
        naive_mem.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    shutil.rmtree(root, ignore_errors=True)
    s, n = statistics.median(safe_t), statistics.median(naive_t)
    sm, nm = statistics.median(safe_mem), statistics.median(naive_mem)
    print(json.dumps({
        "rounds": args.rounds,
        "safe_deploy_median_ms": round(s * 1000, 2),
        "naive_copy_reload_median_ms": round(n * 1000, 2),
        "time_ratio_safe_over_naive": round(s / n, 2),
        "safe_peak_python_kib": round(sm / 1024, 1),
        "naive_peak_python_kib": round(nm / 1024, 1),
        "memory_ratio_safe_over_naive": round(sm / max(nm, 1), 2),
    }, indent=1))


if __name__ == "__main__":
    main()
