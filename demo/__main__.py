"""Run with ``make demo`` (or ``make demo DEMO_ARGS=--keep`` to explore afterwards).

Starts, on loopback high ports in a temp dir: redis-server, Postfix, Dovecot, a
mailtls worker and Flower; makes a throwaway CA; then runs four deploys through the
real ``mailtls`` command and shows what each did. Nothing outside the temp dir is
touched; everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailtls_tasks.core import probe
from tests.support.keys import Pipeline
from tests.support.pki import make_pki
from tests.support.services import REPO, Flower, RedisServer, Worker
from tests.support.stack import MailStack

BOLD, DIM, GREEN, RED, YELLOW, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[33m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = YELLOW = RESET = ""


def say(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}")


def mailtls(env: dict[str, str], *args: str) -> dict[str, object]:
    shown = " ".join(a if len(a) < 60 else "…/" + Path(a).name for a in args)
    print(f"{DIM}$ mailtls {shown}{RESET}")
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args, "--json"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=180)
    out: dict[str, object] = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {"error": p.stderr}
    color = {"deployed": GREEN, "unchanged": GREEN, "rejected": YELLOW, "rolled_back": YELLOW}.get(
        str(out.get("outcome")), RED)
    print(f"  outcome   {color}{out.get('outcome')}{RESET}   (exit {p.returncode})")
    for k in ("fingerprint_sha256", "previous_fingerprint_sha256", "served_fingerprint_sha256"):
        if out.get(k):
            print(f"  {k.replace('_sha256', ''):<22} {str(out[k])[:32]}…")
    steps = out.get("steps") or {}
    if isinstance(steps, dict) and steps:
        print("  steps     " + "  ".join(f"{n} {s['status']} {s['ms']}ms" for n, s in steps.items()))
    if out.get("error"):
        print(f"  error     {out['error']}")
    return out


def show_served(stack: MailStack, names: dict[str, str]) -> None:
    for proto, port in stack.endpoints().items():
        fp = probe.probe("127.0.0.1", port, proto).fingerprint
        print(f"  {proto:<6} 127.0.0.1:{port:<6} serves {fp[:32]}…  {names.get(fp, '?')}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="make demo")
    ap.add_argument("--keep", action="store_true", help="keep everything running for exploring (Ctrl-C stops)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailtls-demo-"))
    os.chmod(root, 0o755)  # noqa: S103 - the postfix and dovecot users must traverse it
    started: list[object] = []
    try:
        say(f"Starting private services on loopback (temp dir {root})")
        pki = make_pki("ec")
        first = pki.leaf("mail.demo.test")
        redis = RedisServer(root / "redis")
        started.append(redis)
        pipeline = Pipeline(root / "pipeline")  # signing key + pinned host keys, as `mailtls keys` makes them
        stack = MailStack(root / "mailhost", first, host="demo-mx", pipeline=pipeline)
        misdir = stack.root / "certs" / "misconfigured"
        misdir.mkdir()
        stack.add("smtp-misconfigured", "postfix", verify_port=stack.postfix.smtp_port, protocol="smtp",
                  verify_timeout=3, cert_path=str(misdir / "cert.pem"), key_path=str(misdir / "key.pem"))
        stack.start()
        started.append(stack)
        print(f"  redis     {redis.url}")
        print(f"  postfix   smtp 127.0.0.1:{stack.postfix.smtp_port}  smtps 127.0.0.1:{stack.postfix.smtps_port}")
        print("  dovecot   " + "  ".join(f"{k} 127.0.0.1:{v}" for k, v in stack.dovecot.ports.items()))
        worker = Worker(stack.config_path, redis.url, root / "worker.log")
        started.append(worker)
        print(f"  worker    host demo-mx, queue mailtls.demo-mx (log {root / 'worker.log'})")
        flower = Flower(redis.url, root / "flower.log", auth="demo:demo")
        started.append(flower)
        print(f"  flower    {flower.url}  (user demo, password demo)")
        env = {**os.environ, "MAILTLS_BROKER_URL": redis.url, "MAILTLS_PIPELINE": str(pipeline.path),
               "PYTHONPATH": str(REPO)}
        print(f"  keys      pipeline signer {pipeline.public[:28]}…, host key pinned in {pipeline.path.name};"
              " bundles travel sealed and signed")

        names = {first.fingerprint: "(initial cert)"}
        say("What the daemons serve before anything happens")
        show_served(stack, names)

        new = pki.leaf("mail.demo.test")
        names[new.fingerprint] = "(NEW cert)"
        files = root / "incoming"
        files.mkdir()
        (files / "fullchain.pem").write_bytes(new.fullchain_pem)
        (files / "privkey.pem").write_bytes(new.key_pem)
        (files / "wrong-key.pem").write_bytes(pki.leaf().key_pem)
        time.sleep(1)

        say("1. Deploy a new certificate to Postfix, then Dovecot (they share the files via symlinks)")
        mailtls(env, "deploy", "smtp", "--cert", str(files / "fullchain.pem"), "--key", str(files / "privkey.pem"))
        mailtls(env, "deploy", "imap", "--cert", str(files / "fullchain.pem"), "--key", str(files / "privkey.pem"))
        print("  verified on the wire, every listener:")
        show_served(stack, names)

        say("2. Deploy the same certificate again: nothing to do, no reload")
        mailtls(env, "deploy", "smtp", "--cert", str(files / "fullchain.pem"), "--key", str(files / "privkey.pem"))

        say("3. A key that does not match the certificate: rejected before anything is touched")
        mailtls(env, "deploy", "smtp", "--cert", str(files / "fullchain.pem"), "--key", str(files / "wrong-key.pem"))

        say("4. A target whose files Postfix does not read: verify fails, the old files come back")
        for f in ("cert.pem", "key.pem"):  # a copy of what Postfix serves now, at a path it never reads
            shutil.copy2(stack.shared / f, misdir / f)
        third = pki.leaf("mail.demo.test")
        names[third.fingerprint] = "(never served)"
        (files / "third.pem").write_bytes(third.fullchain_pem)
        (files / "third-key.pem").write_bytes(third.key_pem)
        mailtls(env, "deploy", "smtp-misconfigured", "--cert", str(files / "third.pem"), "--key",
                str(files / "third-key.pem"))
        print("  what is served now:")
        show_served(stack, names)

        say("The fleet, as the registry in Redis sees it")
        p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "targets"], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=60)
        print(p.stdout.rstrip())

        if args.keep:
            say("Everything keeps running. Try:")
            print(f"  export MAILTLS_BROKER_URL={redis.url} MAILTLS_PIPELINE={pipeline.path}")
            print("  .venv/bin/mailtls history smtp")
            print(f"  swaks -tls -s 127.0.0.1 -p {stack.postfix.smtp_port} --quit-after TLS")
            print(f"  open {flower.url} (demo/demo)")
            print("Ctrl-C stops everything.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        say("Stopping everything")
        for svc in reversed(started):
            svc.stop()  # type: ignore[attr-defined]
        shutil.rmtree(root, ignore_errors=True)
        print("  done; nothing left running")


if __name__ == "__main__":
    sys.exit(main())
