"""Redis coordination: fences, claims, envelopes, deploy records, history, registry.

Redis is a messenger and a view; the host journal is the authority over files (see
docs/protocol.md). Nothing here guards a file: a lost key costs visibility or a
retry, never a wrong file. Nothing stored here contains key material: records are
built from journal records without file hashes, envelopes are sealed for one host.

Keys (prefix ``mailtls:``)::

    fence:<target>       tie-break counter for fences (fence = signed ms x 1000 + counter mod 1000)
    claim:<deploy_id>    "started" (a worker began) or "cancelled" (the client gave up first)
    envelope:<deploy_id> the sealed envelope, until the host has staged it
    deploy:<deploy_id>   JSON deploy record (outcome, steps, fingerprints, error)
    ended:<deploy_id>    pub/sub channel: a message when the record gets its outcome
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

from ..core.journal import DeployRecord
from ..errors import BrokerError

PREFIX = "mailtls:"
RECORD_TTL = 30 * 24 * 3600
ENVELOPE_TTL = 24 * 3600
HISTORY_LEN = 200
HEARTBEAT_TTL = 45
FENCE_TIE_BREAK = 1000
WAIT_RECHECK = 5.0


def public_record(rec: DeployRecord) -> dict[str, Any]:
    """The Redis view of a journal record: no per-file hashes, paths or process ids."""
    return rec.model_dump(mode="json", exclude={"files", "claimed", "runner"})


def _loads(raw: str | None) -> dict[str, Any] | None:
    """A JSON object from Redis, or None (absent, or not ours: whoever can write Redis
    can write anything there, and that must not crash a worker)."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class Coordinator:
    def __init__(self, url_or_client: str | redis.Redis) -> None:  # type: ignore[type-arg]
        self.url = url_or_client if isinstance(url_or_client, str) else None
        if isinstance(url_or_client, str):
            self.r = redis.Redis.from_url(url_or_client, socket_timeout=10, socket_connect_timeout=5,
                                          health_check_interval=30, decode_responses=True)
        else:
            self.r = url_or_client

    def _k(self, *parts: str) -> str:
        return PREFIX + ":".join(parts)

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as err:
            raise BrokerError(f"cannot reach Redis: {err}") from None

    # -- fencing, claims and envelopes ------------------------------------------
    def next_fence(self, target: str, now: float | None = None) -> int:
        """A fence that grows with the pipeline's clock, so Redis losing every key
        cannot make it go backwards; the counter only breaks ties within a millisecond."""
        ms = int((time.time() if now is None else now) * 1000)
        return ms * FENCE_TIE_BREAK + int(self.r.incr(self._k("fence", target))) % FENCE_TIE_BREAK

    def claim(self, deploy_id: str, who: str) -> str:
        """First writer wins: 'started' (worker) or 'cancelled' (client). Returns the winner."""
        key = self._k("claim", deploy_id)
        self.r.set(key, who, nx=True, ex=RECORD_TTL)
        return self.r.get(key) or who

    def put_envelope(self, deploy_id: str, envelope: dict[str, Any]) -> None:
        self.r.set(self._k("envelope", deploy_id), json.dumps(envelope), ex=ENVELOPE_TTL)

    def get_envelope(self, deploy_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k("envelope", deploy_id))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    def drop_envelope(self, deploy_id: str) -> None:
        self.r.delete(self._k("envelope", deploy_id))

    def deliveries(self, deploy_id: str, step: str, retry: int) -> int:
        key = self._k("deliveries", deploy_id, step, str(retry))
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 24 * 3600)
        return int(pipe.execute()[0])

    # -- records and history ---------------------------------------------------
    def put_record(self, data: dict[str, Any]) -> None:
        self.r.set(self._k("deploy", data["deploy_id"]), json.dumps(data), ex=RECORD_TTL)

    def publish(self, rec: DeployRecord) -> dict[str, Any]:
        """Store the journal record's public view, merged over what the client created;
        wake whoever waits when it has ended. Atomic (WATCH), and never turns an ended
        record back into a running one: a late writer cannot undo an outcome."""
        key = self._k("deploy", rec.deploy_id)
        view = public_record(rec)

        def update(pipe: Any) -> dict[str, Any]:
            data = _loads(pipe.get(key)) or {"created": rec.created}
            if data.get("outcome") and not rec.finished:
                return data
            data.update(view)
            pipe.multi()
            pipe.set(key, json.dumps(data), ex=RECORD_TTL)
            if rec.finished:
                pipe.publish(self._k("ended", rec.deploy_id), rec.outcome or "")
            return data

        return cast(dict[str, Any], self.r.transaction(update, key, value_from_callable=True))  # type: ignore[no-untyped-call]

    def finish_unstarted(self, deploy_id: str, outcome: str, error: str, reason: str | None = None) -> None:
        """End a deploy that never reached a host journal (unknown target, cancelled,
        busy past its budget, envelope refused): nothing was touched. Atomic, and only
        if nothing has given it an outcome yet."""
        key = self._k("deploy", deploy_id)

        def update(pipe: Any) -> None:
            data = _loads(pipe.get(key)) or {"deploy_id": deploy_id}
            if data.get("outcome"):
                return
            data.update(outcome=outcome, error=error, reason=reason, phase="done")
            pipe.multi()
            pipe.set(key, json.dumps(data), ex=RECORD_TTL)
            pipe.publish(self._k("ended", deploy_id), outcome)

        self.r.transaction(update, key)  # type: ignore[no-untyped-call]

    def get_record(self, deploy_id: str) -> dict[str, Any] | None:
        return _loads(self.r.get(self._k("deploy", deploy_id)))

    def push_history(self, target: str, deploy_id: str) -> None:
        key = self._k("history", target)
        pipe = self.r.pipeline()
        pipe.lpush(key, deploy_id)
        pipe.ltrim(key, 0, HISTORY_LEN - 1)
        pipe.execute()

    def history(self, target: str, limit: int = 20) -> list[dict[str, Any]]:
        ids = self.r.lrange(self._k("history", target), 0, limit - 1)
        return [r for r in (self.get_record(i) for i in ids) if r]

    def wait_record(self, deploy_id: str, timeout: float) -> dict[str, Any] | None:
        """Block until the record has an outcome (woken by its ``ended`` message, and
        re-reading at least every few seconds), or return the last one seen at the
        deadline. Survives Redis restarting underneath: it resubscribes."""
        deadline = time.monotonic() + timeout
        channel = self._k("ended", deploy_id)
        while True:
            try:
                with self.r.pubsub(ignore_subscribe_messages=True) as ps:
                    ps.subscribe(channel)  # before reading: an ending between the two is not missed
                    while True:
                        rec = self.get_record(deploy_id)
                        left = deadline - time.monotonic()
                        if (rec and rec.get("outcome")) or left <= 0:
                            return rec
                        ps.get_message(timeout=min(left, WAIT_RECHECK))
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

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
