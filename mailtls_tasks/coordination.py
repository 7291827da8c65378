"""Redis coordination: target locks, fencing, deploy records, history, fleet registry.

Redis is shared state for *coordination and visibility*; the host journal stays the
source of truth for what is on disk (Redis may lose data). Nothing stored here ever
contains key material: records are built from journal records without file hashes.

Keys (prefix ``mailtls:``)::

    lock:<target>        deploy_id holding the target (SET NX PX, compare-and-delete)
    fence:<target>       INCR'd per enqueued deploy: the deploy's fencing token
    claim:<deploy_id>    "started" (a worker began) or "cancelled" (the client gave up first)
    deploy:<deploy_id>   JSON deploy record (outcome, steps, fingerprints, error)
    history:<target>     list of deploy ids, newest first
    deliveries:<id>:<step>:<retry>   redeliveries of one message (worker-lost bound)
    host:<host>          JSON inventory of a worker host, with a heartbeat TTL
    target:<target>      the host that serves a target (for routing at enqueue)
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, cast

import redis

from .errors import BrokerError, TargetBusy
from .journal import DeployRecord

PREFIX = "mailtls:"
RECORD_TTL = 30 * 24 * 3600
HISTORY_LEN = 200
LOCK_TTL_MS = 15 * 60 * 1000
HEARTBEAT_TTL = 45

_EXTEND = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def public_record(rec: DeployRecord) -> dict[str, Any]:
    """The Redis view of a journal record: everything but per-file hashes and paths."""
    return rec.model_dump(mode="json", exclude={"files"})


class Coordinator:
    def __init__(self, url_or_client: str | redis.Redis) -> None:  # type: ignore[type-arg]
        self.url = url_or_client if isinstance(url_or_client, str) else None
        if isinstance(url_or_client, str):
            self.r = redis.Redis.from_url(url_or_client, socket_timeout=10, socket_connect_timeout=5,
                                          health_check_interval=30, decode_responses=True)
        else:
            self.r = url_or_client
        self._extend = self.r.register_script(_EXTEND)
        self._release = self.r.register_script(_RELEASE)

    def _k(self, *parts: str) -> str:
        return PREFIX + ":".join(parts)

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as err:
            raise BrokerError(f"cannot reach Redis: {err}") from None

    # -- locks --------------------------------------------------------------
    def acquire(self, target: str, deploy_id: str, ttl_ms: int = LOCK_TTL_MS) -> None:
        """Take (or keep) the target's lock for ``deploy_id``; TargetBusy if another holds it."""
        got = int(self._extend(keys=[self._k("lock", target)], args=[deploy_id, ttl_ms]))
        if got == 0:
            raise TargetBusy(f"target {target!r} is busy with deploy {self.holder(target)}")

    def holder(self, target: str) -> str | None:
        return self.r.get(self._k("lock", target))

    def release(self, target: str, deploy_id: str) -> bool:
        return bool(self._release(keys=[self._k("lock", target)], args=[deploy_id]))

    # -- fencing and claims ---------------------------------------------------
    def next_fence(self, target: str) -> int:
        return int(self.r.incr(self._k("fence", target)))

    def claim(self, deploy_id: str, who: str) -> str:
        """First writer wins: 'started' (worker) or 'cancelled' (client). Returns the winner."""
        key = self._k("claim", deploy_id)
        self.r.set(key, who, nx=True, ex=RECORD_TTL)
        return self.r.get(key) or who

    def deliveries(self, deploy_id: str, step: str, retry: int) -> int:
        key = self._k("deliveries", deploy_id, step, str(retry))
        n = int(self.r.incr(key))
        self.r.expire(key, 24 * 3600)
        return n

    # -- records and history ---------------------------------------------------
    def put_record(self, data: dict[str, Any]) -> None:
        self.r.set(self._k("deploy", data["deploy_id"]), json.dumps(data), ex=RECORD_TTL)

    def publish(self, rec: DeployRecord) -> dict[str, Any]:
        """Store the journal record's public view, merged over what the client created."""
        data = self.get_record(rec.deploy_id) or {}
        data.update(public_record(rec))
        self.put_record(data)
        return data

    def finish_unstarted(self, deploy_id: str, outcome: str, error: str) -> None:
        """End a deploy that never reached a host journal (unknown target, cancelled)."""
        data = self.get_record(deploy_id) or {"deploy_id": deploy_id}
        if not data.get("outcome"):
            data.update(outcome=outcome, error=error, phase="done")
            self.put_record(data)
            if data.get("target"):
                self.release(data["target"], deploy_id)

    def get_record(self, deploy_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k("deploy", deploy_id))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    def push_history(self, target: str, deploy_id: str) -> None:
        key = self._k("history", target)
        pipe = self.r.pipeline()
        pipe.lpush(key, deploy_id)
        pipe.ltrim(key, 0, HISTORY_LEN - 1)
        pipe.execute()

    def history(self, target: str, limit: int = 20) -> list[dict[str, Any]]:
        ids = self.r.lrange(self._k("history", target), 0, limit - 1)
        return [r for r in (self.get_record(i) for i in ids) if r]

    def wait_record(self, deploy_id: str, timeout: float, poll: float = 0.2) -> dict[str, Any] | None:
        """Poll until the record has an outcome, or return the last one seen at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.get_record(deploy_id)
            if rec and rec.get("outcome"):
                return rec
            if time.monotonic() >= deadline:
                return rec
            time.sleep(poll)

    # -- fleet registry ------------------------------------------------------------
    def publish_host(self, host: str, inventory: dict[str, Any], ttl: int = HEARTBEAT_TTL) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        pipe = self.r.pipeline()
        pipe.set(self._k("host", host), json.dumps({"host": host, "heartbeat": now, "targets": inventory}), ex=ttl)
        pipe.sadd(self._k("hosts"), host)
        for name, entry in inventory.items():
            # The target -> host mapping outlives the heartbeat: a deploy to a target whose
            # worker is briefly down should queue for it, not be refused as unknown.
            pipe.set(self._k("target", name), host)
            pipe.set(self._k("inventory", name), json.dumps(entry))
        pipe.execute()

    def target_host(self, target: str) -> str | None:
        return self.r.get(self._k("target", target))

    def host_alive(self, host: str) -> bool:
        return bool(self.r.exists(self._k("host", host)))

    def fleet(self) -> list[dict[str, Any]]:
        rows = []
        for host in sorted(self.r.smembers(self._k("hosts"))):
            raw = self.r.get(self._k("host", host))
            alive = raw is not None
            if raw:
                targets = json.loads(raw)["targets"]
            else:  # heartbeat gone: show the last inventory we have, marked dead
                targets = {}
                for key in self.r.scan_iter(self._k("inventory", "*")):
                    entry = json.loads(cast(str, self.r.get(key)) or "{}")
                    if entry.get("host") == host:
                        targets[entry["target"]] = entry
            for entry in targets.values():
                rows.append({**entry, "worker_alive": alive})
        return sorted(rows, key=lambda e: (e["host"], e["target"]))
