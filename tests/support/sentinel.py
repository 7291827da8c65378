"""A Redis that fails over, on loopback: a master, one replica and three sentinels
(``redis-server --sentinel``), every node behind the same ACL user, the sentinels
behind a password of their own. ``kill_master`` SIGKILLs the master;
``wait_failover`` returns once the sentinels agree on the promoted replica."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from .services import free_port, require, wait_port

MASTER_NAME = "mailtls"
USER, PASSWORD = "mailtls", "node-pw"
SENTINEL_PASSWORD = "sentinel-pw"


class SentinelSet:
    def __init__(self, root: Path) -> None:
        self.binary = require("redis-server")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port(), free_port()]  # master, replica
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        acl = (f"user default off\nuser {USER} on >{PASSWORD} ~* &* +@all\n")
        (root / "users.acl").write_text(acl)
        for i, port in enumerate(self.ports):
            conf = [f"port {port}", "bind 127.0.0.1", f"dir {root}", f"dbfilename dump-{port}.rdb",
                    "save \"\"", "appendonly no", f"aclfile {root / 'users.acl'}",
                    f"masteruser {USER}", f"masterauth {PASSWORD}",
                    # a deploy record acknowledged by the master may be lost in a failover
                    # (replication is asynchronous): what the tests check survives that
                    "repl-diskless-sync no"]
            if i == 1:
                conf.append(f"replicaof 127.0.0.1 {self.ports[0]}")
            (root / f"node-{port}.conf").write_text("\n".join(conf) + "\n")
        for port in self.sentinel_ports:
            (root / f"sentinel-{port}.conf").write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {root}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports[0]} 2",
                f"sentinel auth-user {MASTER_NAME} {USER}", f"sentinel auth-pass {MASTER_NAME} {PASSWORD}",
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 6000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                f"requirepass {SENTINEL_PASSWORD}", f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
            ]) + "\n")
        for port in self.ports:
            self._start(port, [str(root / f"node-{port}.conf")])
        self._wait_replica()
        for port in self.sentinel_ports:
            self._start(port, [str(root / f"sentinel-{port}.conf"), "--sentinel"])
        self._wait_sentinels()

    def _start(self, port: int, args: list[str]) -> None:
        log = (self.root / f"{port}.log").open("ab")
        self.procs[port] = subprocess.Popen([self.binary, *args], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(port, 15)

    def node(self, port: int) -> redis.Redis:  # type: ignore[type-arg]
        return redis.Redis(port=port, username=USER, password=PASSWORD, socket_timeout=2, decode_responses=True)

    def sentinel(self, port: int) -> redis.Redis:  # type: ignore[type-arg]
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2, decode_responses=True)

    def _wait_replica(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.node(self.ports[1]).info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.1)

    def _wait_sentinels(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                known = [int(self.sentinel(p).sentinel_master(MASTER_NAME).get("num-other-sentinels", 0))
                         for p in self.sentinel_ports]
                if min(known) >= 2:
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the sentinels never found each other"
            time.sleep(0.2)

    @property
    def url(self) -> str:
        """The broker URL an operator writes: every sentinel, the master's name."""
        nodes = ";".join(f"sentinel://{USER}:{PASSWORD}@127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"{nodes}/0?master_name={MASTER_NAME}&sentinel_password={SENTINEL_PASSWORD}"

    def master_port(self) -> int:
        for p in self.sentinel_ports:
            try:
                return int(self.sentinel(p).sentinel_get_master_addr_by_name(MASTER_NAME)[1])
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def kill_master(self) -> int:
        port = self.master_port()
        os.killpg(self.procs[port].pid, signal.SIGKILL)
        self.procs[port].wait(10)
        return port

    def wait_failover(self, old: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                new = self.master_port()
                if new != old and self.node(new).info("replication").get("role") == "master":
                    return new
            except (redis.RedisError, RuntimeError):
                pass
            assert time.monotonic() < deadline, "no failover within the timeout"
            time.sleep(0.2)

    def restart_as_replica(self, port: int) -> None:
        """A killed node started again: the sentinels make it a replica of the new master."""
        self._start(port, [str(self.root / f"node-{port}.conf")])
        deadline = time.monotonic() + 60
        while True:
            try:
                info = self.node(port).info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the old master never came back as a replica"
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
