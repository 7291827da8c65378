"""Run with ``make demo`` (or ``make demo DEMO_ARGS=--keep`` to explore afterwards).

Starts, on loopback in a temp dir: redis-server, Flower, and two mail hosts ``mx1``
and ``mx2`` -- each with its own Postfix and Dovecot, its own files and its own worker,
and both with the very same targets file (each worker runs with ``--host``). Makes a
throwaway CA, then runs the real ``mailtls`` command -- every command is printed
exactly as it is run -- to deploy, redeploy, refuse a bad key, roll a certificate out
to both hosts with a canary wave, watch a rollout halt and roll back, and audit what
every listener serves. Nothing outside the temp dir is touched; everything is stopped
at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailtls_tasks.core import probe
from tests.support.fleet import MAIL_NAME, Fleet
from tests.support.keys import Pipeline
from tests.support.pki import make_pki
from tests.support.services import REPO, Flower, RedisServer

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = RESET = ""
MAILTLS = str(Path(sys.executable).parent / "mailtls")  # the console script `pip install` put beside python


class Stopped(BaseException):
    """SIGTERM or SIGHUP (a `kill`, systemd, a closed terminal): unwinds like Ctrl-C, so
    the cleanup runs -- every service stopped, the temp dir and its private keys gone."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def say(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def mailtls(env: dict[str, str], *args: str) -> int:
    """Run ``mailtls ARGS`` and show it as run, then its output and exit code."""
    print(f"{DIM}$ mailtls {' '.join(shlex.quote(a) for a in args)}{RESET}", flush=True)
    p = subprocess.run([MAILTLS, *args], capture_output=True, text=True, env=env, cwd=env["DEMO_DIR"], timeout=300)
    for line in (p.stdout + p.stderr).rstrip().splitlines():
        print(f"  {line}")
    print(f"  {DIM}(exit {p.returncode}){RESET}", flush=True)
    return p.returncode


def show_served(fleet: Fleet, names: dict[str, str]) -> None:
    for name, h in fleet.hosts.items():
        for proto, port in (("smtp", fleet.smtp_ports[0]), ("imaps", fleet.dovecot_ports["imaps"])):
            fp = probe.probe(h.address, port, proto, MAIL_NAME).fingerprint
            print(f"  {name} {proto:<6} {h.address}:{port:<6} serves {fp[:24]}…  {names.get(fp, '?')}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="make demo")
    ap.add_argument("--keep", action="store_true", help="keep everything running for exploring (Ctrl-C stops)")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    root = Path(tempfile.mkdtemp(prefix="mailtls-demo-"))
    os.chmod(root, 0o755)  # noqa: S103 - the postfix and dovecot users must traverse it
    started: list[object] = []
    try:
        say(f"Starting private services on loopback (temp dir {root})")
        pki = make_pki("ec")
        (root / "demo-ca.pem").write_bytes(pki.root.cert_pem)
        redis = RedisServer(root / "redis")
        started.append(redis)
        pipeline = Pipeline(root / "pipeline")  # signing key + pinned host keys, as `mailtls keys` makes them
        flower = Flower(redis.url, root / "flower.log", auth="demo:demo")
        started.append(flower)
        fleet = Fleet(root / "fleet", pki, pipeline, ["mx1", "mx2"], trust_anchors=root / "demo-ca.pem",
                      with_www=False)
        started.append(fleet)
        fleet.start(redis.url)
        print(f"  redis     {redis.url}")
        for name, h in fleet.hosts.items():
            print(f"  {name}       Postfix smtp {h.address}:{fleet.smtp_ports[0]}, Dovecot imaps "
                  f"{h.address}:{fleet.dovecot_ports['imaps']}, worker on queue mailtls.{name}")
        print(f"  targets   one file for both hosts: {fleet.targets_file}")
        print(f"  flower    {flower.url}  (user demo, password demo)")
        print(f"  commands  `mailtls` below is {MAILTLS}, run with MAILTLS_BROKER_URL and MAILTLS_PIPELINE set")
        print(f"  keys      bundles travel sealed for each host and signed by the pipeline ({pipeline.path.name})")
        env = {**os.environ, "MAILTLS_BROKER_URL": redis.url, "MAILTLS_PIPELINE": str(pipeline.path),
               "PYTHONPATH": str(REPO), "DEMO_DIR": str(root / "incoming")}
        incoming = root / "incoming"
        incoming.mkdir()

        names = {fleet.initial.fingerprint: "(initial cert)"}
        say("The fleet as its workers registered it: a target is HOST/NAME")
        mailtls(env, "targets")
        say("What every listener serves before anything happens")
        show_served(fleet, names)

        new = pki.leaf(MAIL_NAME)
        names[new.fingerprint] = "(NEW cert)"
        (incoming / "fullchain.pem").write_bytes(new.fullchain_pem)
        (incoming / "privkey.pem").write_bytes(new.key_pem)
        (incoming / "wrong-key.pem").write_bytes(pki.leaf(MAIL_NAME).key_pem)

        say("1. A bare name is defined on both hosts: mailtls asks which one")
        mailtls(env, "deploy", "smtp", "--cert", "fullchain.pem", "--key", "privkey.pem")

        say("2. Deploy to one daemon on one host: staged, validated, committed, reloaded, verified on the wire")
        mailtls(env, "deploy", "mx1/smtp", "--cert", "fullchain.pem", "--key", "privkey.pem")

        say("3. The same certificate again: nothing to do, no reload")
        mailtls(env, "deploy", "mx1/smtp", "--cert", "fullchain.pem", "--key", "privkey.pem")

        say("4. A key that does not match the certificate: rejected before anything is touched")
        mailtls(env, "deploy", "mx1/smtp", "--cert", "fullchain.pem", "--key", "wrong-key.pem")

        say("5. Roll it out to every daemon serving mail.fleet.test, on both hosts: a canary first, then the rest")
        mailtls(env, "rollout", "--cert", "fullchain.pem", "--key", "privkey.pem", "--covers", MAIL_NAME,
                "--waves", "1,100%")
        show_served(fleet, names)

        say("6. The next certificate, but mx2's Dovecot never really reloads: verify fails there, its old files "
            "come back, and the rollout halts before touching the rest")
        third = pki.leaf(MAIL_NAME)
        names[third.fingerprint] = "(THIRD cert)"
        (incoming / "third.pem").write_bytes(third.fullchain_pem)
        (incoming / "third-key.pem").write_bytes(third.key_pem)
        fleet.hosts["mx2"].dv_reload.skip_once()
        mailtls(env, "rollout", "--cert", "third.pem", "--key", "third-key.pem", "--label", "imap",
                "--waves", "1,2")
        show_served(fleet, names)

        say("7. The drift audit: files changed behind a daemon's back are caught")
        by_hand = pki.leaf(MAIL_NAME, days=5)
        mx2 = fleet.hosts["mx2"]
        mx2.path("postfix", "key").write_bytes(by_hand.key_pem)
        mx2.path("postfix", "cert").write_bytes(by_hand.fullchain_pem)
        print(f"  (a certificate valid for 5 more days copied by hand over {mx2.path('postfix', 'cert')})")
        mailtls(env, "audit", "--now")

        say("The fleet now: what each target serves and how its last deploy ended, and why")
        mailtls(env, "targets")

        if args.keep:
            say("Everything keeps running. Try, in another terminal:")
            print(f"  export MAILTLS_BROKER_URL={redis.url} MAILTLS_PIPELINE={pipeline.path}")
            print(f"  {MAILTLS} history mx1/smtp")
            print(f"  {MAILTLS} audit --now")
            print(f"  openssl s_client -connect {fleet.hosts['mx1'].address}:{fleet.smtp_ports[0]} -starttls smtp "
                  f"-servername {MAIL_NAME} -CAfile {root / 'demo-ca.pem'} </dev/null")
            print(f"  Flower: {flower.url} (demo / demo)")
            print("Ctrl-C stops everything.", flush=True)  # piped (tee, a log file): seen now, not at exit
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        say("Stopping everything")
        for svc in reversed(started):
            svc.stop()  # type: ignore[attr-defined]
        shutil.rmtree(root, ignore_errors=True)
        print("  done; nothing left running")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stopped as stopped:
        sys.exit(128 + stopped.signum)
