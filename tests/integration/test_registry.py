"""The fleet registry against a real Redis: one live worker per host, even when two
start at the same moment; a host gone for good can be forgotten."""

from __future__ import annotations

import threading

import pytest

from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.errors import HostTaken, UnknownTarget
from tests.support.services import RedisServer

pytestmark = pytest.mark.integration


def _entry(host: str, name: str, labels: list[str] | None = None) -> dict[str, object]:
    return {"target": name, "host": host, "mode": "postfix", "names": [], "labels": labels or []}


def test_two_workers_starting_together_cannot_both_register(redis_server: RedisServer) -> None:
    co = Coordinator(redis_server.url)
    won: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(8)

    def start(i: int) -> None:
        mine = Coordinator(redis_server.url)
        barrier.wait()
        try:
            mine.register_host("race", f"machine-{i}:1|b:{i}:1", {"t": _entry("race", "t")}, alive=lambda _: True)
            won.append(str(i))
        except HostTaken:
            refused.append(str(i))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert co.r.get("mailtls:hostowner:race") == f"machine-{won[0]}:1|b:{won[0]}:1"


def test_a_restart_replaces_its_dead_predecessor_but_never_without_a_machine_id(redis_server: RedisServer) -> None:
    co = Coordinator(redis_server.url)
    co.register_host("restart", "m:7|b:1:1", {"t": _entry("restart", "t")}, alive=lambda _: True)
    co.register_host("restart", "m:7|b:2:1", {"t": _entry("restart", "t")}, alive=lambda _: False)  # same machine
    assert co.r.get("mailtls:hostowner:restart") == "m:7|b:2:1"
    with pytest.raises(HostTaken):  # same machine, predecessor alive
        co.register_host("restart", "m:7|b:3:1", {}, alive=lambda _: True)
    with pytest.raises(HostTaken):  # another PID namespace (a container): its pids mean nothing here
        co.register_host("restart", "m:8|b:3:1", {}, alive=lambda _: False)
    co.register_host("anon", "unknown:1|b:1:1", {}, alive=lambda _: True)
    with pytest.raises(HostTaken):  # no machine id: cannot tell it is the same machine, so waits for the TTL
        co.register_host("anon", "unknown:1|b:2:1", {}, alive=lambda _: False)


def test_forget_a_host_that_is_gone(redis_server: RedisServer) -> None:
    co = Coordinator(redis_server.url)
    co.register_host("gone", "m:1|b:1:1", {"regsmtp": _entry("gone", "regsmtp", ["regedge"]),
                                           "imap": _entry("gone", "imap")}, alive=lambda _: True)
    co.register_host("stays", "m:2|b:1:1", {"regsmtp": _entry("stays", "regsmtp", ["regedge"])},
                     alive=lambda _: True)
    co.put_audit("gone/regsmtp", {"target": "gone/regsmtp"})
    with pytest.raises(HostTaken, match="live worker"):
        co.forget_host("gone")
    assert co.release_host("gone", "m:1|b:1:1") and not co.host_alive("gone")
    assert co.forget_host("gone") == 2
    assert "gone" not in {r["host"] for r in co.fleet()} and "gone" not in co.r.smembers("mailtls:hosts")
    assert co.resolve("regsmtp") == ("stays", "regsmtp")  # no longer ambiguous
    assert co.r.smembers("mailtls:label:regedge") == {"stays/regsmtp"}
    assert co.r.get("mailtls:audit:gone/regsmtp") is None
    with pytest.raises(UnknownTarget):
        co.resolve("gone/imap")
    with pytest.raises(UnknownTarget, match="no host 'gone'"):
        co.forget_host("gone")


def test_a_worker_started_before_redis_waits_for_it(tmp_path, pki, pipeline) -> None:  # type: ignore[no-untyped-def]
    """Redis down when the worker starts (a boot race, maintenance): the worker waits
    and registers once Redis answers, instead of exiting into systemd's start limit."""
    import subprocess
    import time

    from tests.support.host import MailHost
    from tests.support.services import Worker, free_port, require, wait_port

    port = free_port()
    host = MailHost(tmp_path / "mx9", host="mx9")
    host.enroll(pipeline)
    host.add_target("late")
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(w=Worker(host.config_path, f"redis://127.0.0.1:{port}/0",
                                                              tmp_path / "worker.log")), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    log = tmp_path / "worker.log"
    while time.monotonic() < deadline and "Redis does not answer" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    assert "Redis does not answer" in log.read_text()
    srv = subprocess.Popen([require("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                            "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        t.join(60)
        assert "w" in box, "the worker never became ready after Redis came up"
        assert Coordinator(f"redis://127.0.0.1:{port}/0").resolve("mx9/late") == ("mx9", "late")
    finally:
        w = box.get("w")
        if isinstance(w, Worker):
            w.stop()
        srv.terminate()
        srv.wait(10)
        host.close()
