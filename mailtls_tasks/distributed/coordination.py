"""Redis coordination: fences, claims, envelopes, deploy records, history, registry.

Redis is a messenger and a view; the host journal is the authority over files (see
docs/protocol.md). Nothing here guards a file: a lost key costs visibility or a
retry, never a wrong file. Nothing stored here contains key material: records are
built from journal records without file hashes, envelopes are sealed for one host.

Keys (prefix ``mailtls:``)::

    fence:<host>/<name>  tie-break counter for fences (fence = signed ms x 1000 + counter mod 1000)
    claim:<deploy_id>    "started" (a worker began), "waiting" (its stage found the target busy and
                         will try again: nothing touched, the client may still cancel) or
                         "cancelled" (the client gave up first)
    envelope:<deploy_id> the sealed envelope, until the host has staged it
    deploy:<deploy_id>   JSON deploy record (outcome, steps, fingerprints, error)
    ended:<deploy_id>    pub/sub channel: a message when the record gets its outcome
    history:<host>/<name>     list of deploy ids, newest first
    deliveries:<id>:<step>:<retry>   redeliveries of one message (worker-lost bound)
    host:<host>               heartbeat of the host's worker (TTL)
    hostowner:<host>          the worker instance serving the host (machine|process, TTL)
    hosts                     every host ever registered
    hosttargets:<host>        the target names a host defines
    inventory:<host>/<name>   one target's public facts (paths, names, labels, what is deployed)
    name:<name>               the hosts defining NAME (a bare NAME must be unambiguous)
    label:<label>             the addresses carrying a label
    rollout:<id>              a rollout's record; audit:<host>/<name> a target's last audit
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis

from ..errors import AmbiguousTarget, BrokerError, HostTaken, UnknownTarget
from .broker import sentinel_spec

if TYPE_CHECKING:
    from ..core.journal import DeployRecord

PREFIX = "mailtls:"
RECORD_TTL = 30 * 24 * 3600
ENVELOPE_TTL = 24 * 3600
HISTORY_LEN = 200
HEARTBEAT_TTL = 45
FENCE_TIE_BREAK = 1000
WAIT_RECHECK = 5.0

# Renew a host claim only while it is ours (or has lapsed and nobody took it).
# First writer wins, except over "waiting" (a stage that found the target busy and
# let go of its claim until it tries again): the worker's next try or the client's
# cancel takes it.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == 'waiting' then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
return v
"""
# A busy stage lets go of its claim: only its own "started", never a cancel.
_LET_GO = """
if redis.call('GET', KEYS[1]) == 'started' then
  redis.call('SET', KEYS[1], 'waiting', 'EX', ARGV[1])
  return 1
end
return 0
"""
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 2
end
return 0
"""


# Claim a host: taken if free, ours already, or (ARGV[3]) still held by the dead
# instance we are replacing; else returns the holder. One step, so two workers
# starting together cannot both win.
_CLAIM_HOST = """
local v = redis.call('GET', KEYS[1])
if not v or v == ARGV[1] or (ARGV[3] ~= '' and v == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return false
end
return v
"""

# Give up a host claim, only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2]) return 1
end
return 0
"""

# Store a deploy record unless it has already ended and this one has not (a late
# writer must not undo an outcome); publish on the record's ``ended`` channel when it
# ends. The record is written whole: the worker's journal view is the complete record.
_PUBLISH = """
if ARGV[2] ~= '1' then
  local raw = redis.call('GET', KEYS[1])
  if raw then
    local ok, d = pcall(cjson.decode, raw)
    if ok and type(d) == 'table' and d['outcome'] and d['outcome'] ~= cjson.null then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
if ARGV[2] == '1' then redis.call('PUBLISH', KEYS[2], ARGV[4]) end
return 1
"""


def public_record(rec: DeployRecord) -> dict[str, Any]:
    """The Redis view of a journal record: no per-file hashes, paths or process ids;
    the target as its fleet address, HOST/NAME."""
    out = rec.model_dump(mode="json", exclude={"files", "claimed", "runner"})
    out["name"] = rec.target
    out["target"] = f"{rec.host}/{rec.target}" if rec.host else rec.target
    return out


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


_coordinators: dict[str, Coordinator] = {}


FAILOVER_RETRIES = 40  # 0.1, 0.2, 0.4 ... then 1 s apart: about 35 s of a failover ridden out


def _sentinel_master(url: str) -> redis.Redis:  # type: ignore[type-arg]
    """The master the sentinels name, as a client that asks them again after a
    failover (redis-py's SentinelConnectionPool: a connection to a demoted master
    fails and the next one goes to the new master)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
    from redis.sentinel import MasterNotFoundError, Sentinel

    spec = sentinel_spec(url)
    assert spec is not None
    sentinels = Sentinel(list(spec.sentinels), sentinel_kwargs=spec.sentinel_kwargs(), socket_timeout=10,
                         socket_connect_timeout=5)
    # A failover takes seconds (down-after-milliseconds, the vote, the promotion): each
    # command is tried again meanwhile, up to FAILOVER_WAIT, instead of failing the deploy
    # or rollout that sent it. What that can repeat is safe to: a fence only has to grow,
    # and a message sent twice is a duplicate the hosts already take in (claims, journal).
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=FAILOVER_RETRIES)
    return sentinels.master_for(spec.master_name, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=30, decode_responses=True, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError, MasterNotFoundError],
                                connection_class=_failover_connection_class(), **spec.node_kwargs())


_FAILOVER_CONNECTION: list[type] = []


def _failover_connection_class() -> type:
    """redis-py's sentinel connection, asking the sentinels for the master on *every*
    reconnect. redis-py (8.2) reconnects a dropped connection through
    ``connect_check_health``, which goes back to the address it had -- the dead
    master -- until every retry is spent (redis/redis-py#3874, open); found by the
    Sentinel test, which killed the master under a rollout."""
    if not _FAILOVER_CONNECTION:
        from redis.sentinel import SentinelManagedConnection

        class FailoverConnection(SentinelManagedConnection):
            def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
                if not getattr(self, "_sock", None) and self.connection_pool.is_master:
                    self.host, self.port = self.connection_pool.get_master_address()
                super().connect_check_health(  # type: ignore[misc]  # (redis-py's stubs lag its code)
                    check_health=check_health, retry_socket_connect=retry_socket_connect)

        _FAILOVER_CONNECTION.append(FailoverConnection)
    return _FAILOVER_CONNECTION[0]


class Coordinator:
    def __init__(self, url_or_client: str | redis.Redis) -> None:  # type: ignore[type-arg]
        self.url = url_or_client if isinstance(url_or_client, str) else None
        if isinstance(url_or_client, str) and sentinel_spec(url_or_client) is not None:
            self.r = _sentinel_master(url_or_client)
        elif isinstance(url_or_client, str):
            self.r = redis.Redis.from_url(url_or_client, socket_timeout=10, socket_connect_timeout=5,
                                          health_check_interval=30, decode_responses=True)
        else:
            self.r = url_or_client

        self._renew = self.r.register_script(_RENEW)
        self._claim = self.r.register_script(_CLAIM)
        self._let_go = self.r.register_script(_LET_GO)
        self._publish = self.r.register_script(_PUBLISH)
        self._release = self.r.register_script(_RELEASE)
        self._claim_host = self.r.register_script(_CLAIM_HOST)

    @classmethod
    def for_url(cls, url: str) -> Coordinator:
        """One per broker URL and process: a pipeline enqueueing many deploys reuses
        one connection pool instead of connecting (and handshaking TLS) per call.
        redis-py's pool notices a fork and starts afresh in the child."""
        co = _coordinators.get(url)
        if co is None:
            co = _coordinators[url] = cls(url)
        return co

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
        return self._fence(now, self.r.incr(self._k("fence", target)))

    @staticmethod
    def _fence(now: float | None, counter: Any) -> int:
        ms = int((time.time() if now is None else now) * 1000)
        return ms * FENCE_TIE_BREAK + int(counter) % FENCE_TIE_BREAK

    def resolve_with_fence(self, target: str, now: float) -> tuple[str, str, int]:
        """``resolve`` and ``next_fence`` together: one round trip for a ``HOST/NAME``."""
        host, sep, name = target.partition("/")
        if not sep:
            host, name = self.resolve(target)
            return host, name, self.next_fence(f"{host}/{name}", now)
        pipe = self.r.pipeline(transaction=False)
        pipe.sismember(self._k("hosttargets", host), name)
        pipe.incr(self._k("fence", target))  # a fence spent on an unknown target costs nothing
        known, counter = pipe.execute()
        if not known:
            self.resolve(target)  # raises UnknownTarget, naming what the host has
        return host, name, self._fence(now, counter)

    def claim(self, deploy_id: str, who: str) -> str:
        """First writer wins: 'started' (worker) or 'cancelled' (client), over nothing
        or a busy stage's 'waiting'. Returns the winner."""
        return str(self._claim(keys=[self._k("claim", deploy_id)], args=[who, RECORD_TTL]))

    def once(self, key: str, ttl: int) -> bool:
        """True the first time ``key`` is asked for within ``ttl`` seconds (a notice
        that must not repeat every audit)."""
        return bool(self.r.set(self._k(key), "1", nx=True, ex=ttl))

    def let_go(self, deploy_id: str) -> bool:
        """A stage that found its target busy, nothing of the deploy in its journal,
        and will try again: until it does, the client may cancel (its wait means
        what it says). False if the claim is no longer this worker's 'started'."""
        return bool(self._let_go(keys=[self._k("claim", deploy_id)], args=[RECORD_TTL]))

    def claim_with_envelope(self, deploy_id: str) -> tuple[str, dict[str, Any] | None]:
        """The worker's claim ('started' unless the client cancelled first) and the
        deploy's envelope, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        self._claim(keys=[self._k("claim", deploy_id)], args=["started", RECORD_TTL], client=pipe)
        pipe.get(self._k("envelope", deploy_id))
        claim, raw = pipe.execute()
        return str(claim), _loads(raw)

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

    def create_deploy(self, data: dict[str, Any], envelope: dict[str, Any],
                      message: tuple[str, str] | None = None) -> None:
        """A new deploy's record, history entry and envelope, and then its first message
        (``message``: queue, payload): one transaction, so a worker never sees a message
        without its record and envelope, nor Redis a record half written (the envelope
        travels beside the messages, never in them)."""
        self.create_deploys([(data, envelope)], message)

    def create_deploys(self, deploys: list[tuple[dict[str, Any], dict[str, Any]]],
                       message: tuple[str, str] | None = None) -> None:
        """``create_deploy`` for several deploys and the one message that runs them all
        (a batch: ``mailtls.batch``), in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        for data, envelope in deploys:
            deploy_id = data["deploy_id"]
            pipe.set(self._k("deploy", deploy_id), json.dumps(data), ex=RECORD_TTL)
            self._queue_history(pipe, data["target"], deploy_id)
            pipe.set(self._k("envelope", deploy_id), json.dumps(envelope), ex=ENVELOPE_TTL)
        if message is not None:
            pipe.lpush(*message)
        pipe.execute()

    def publish(self, rec: DeployRecord, inventory: dict[str, Any] | None = None) -> None:
        """Store the journal record's public view and wake whoever waits once it has
        ended; with ``inventory``, refresh that target's registry entry in the same
        round trip. Atomic (a script), and never turns an ended record back into a
        running one: a late writer cannot undo an outcome."""
        view = public_record(rec)
        keys = [self._k("deploy", rec.deploy_id), self._k("ended", rec.deploy_id)]
        args = [json.dumps(view), "1" if rec.finished else "0", RECORD_TTL, rec.outcome or ""]
        if inventory is None:  # most steps: one EVALSHA (a pipeline would first ask SCRIPT EXISTS)
            self._publish(keys=keys, args=args)
            return
        pipe = self.r.pipeline(transaction=False)
        self._publish(keys=keys, args=args, client=pipe)
        self._queue_target(pipe, inventory, None)
        pipe.execute()

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
        pipe = self.r.pipeline()
        self._queue_history(pipe, target, deploy_id)
        pipe.execute()

    def _queue_history(self, pipe: Any, target: str, deploy_id: str) -> None:
        key = self._k("history", target)
        pipe.lpush(key, deploy_id)
        pipe.ltrim(key, 0, HISTORY_LEN - 1)

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
    # A target is HOST/NAME. Each host registers its own names (so identical targets
    # files on every host are fine); a bare NAME resolves only while one host has it.
    def register_host(self, host: str, instance: str, entries: dict[str, dict[str, Any]],
                      alive: Callable[[str], bool], ttl: int = HEARTBEAT_TTL) -> None:
        """Claim ``host`` for this worker ``instance`` and publish its targets.

        Refused (HostTaken) while another live instance serves the same host name: two
        workers consuming one queue would take each other's deploys. ``alive(instance)``
        says whether a previous instance on this machine is still running."""
        owner_key = self._k("hostowner", host)
        current = self._claim_host(keys=[owner_key], args=[instance, ttl, ""])
        if current:  # another instance holds it: a dead predecessor on this machine may be replaced
            same_machine = current.split("|", 1)[0] == instance.split("|", 1)[0] and not current.startswith("unknown")
            if not same_machine or alive(current.split("|", 1)[1]):
                raise HostTaken(f"host {host!r} is already served by another live worker ({current.split('|')[0][:12]}"
                                f"…, heartbeat within {ttl}s): refusing to register; give this worker its own "
                                "`host` (or `--host`)")
            if self._claim_host(keys=[owner_key], args=[instance, ttl, current]):
                raise HostTaken(f"host {host!r}: another worker registered at the same moment; refusing")
        old_names = set(self.r.smembers(self._k("hosttargets", host)))
        every = sorted(old_names | set(entries))
        olds = dict(zip(every, self.r.mget([self._k("inventory", f"{host}/{n}") for n in every]), strict=True)) \
            if every else {}
        pipe = self.r.pipeline(transaction=True)  # all of a host's targets appear at once
        for name in old_names - set(entries):
            addr = f"{host}/{name}"
            pipe.srem(self._k("name", name), host)
            for label in (_loads(olds.get(name)) or {}).get("labels") or []:
                pipe.srem(self._k("label", label), addr)
            pipe.delete(self._k("inventory", addr))
            pipe.srem(self._k("hosttargets", host), name)
        for entry in entries.values():
            self._queue_target(pipe, entry, _loads(olds.get(entry["target"])) or {})
        pipe.sadd(self._k("hosts"), host)
        pipe.execute()
        self._heartbeat_record(host, ttl)

    def heartbeat(self, host: str, instance: str, ttl: int = HEARTBEAT_TTL) -> int:
        """Refresh this worker's claim on ``host``: 1 renewed; 2 the claim was gone (a
        heartbeat missed, or Redis lost its data: register the targets again); 0 another
        instance has taken the host over."""
        state = int(self._renew(keys=[self._k("hostowner", host)], args=[instance, ttl]))
        if state:
            self._heartbeat_record(host, ttl)
        return state

    def release_host(self, host: str, instance: str) -> bool:
        """A worker stopping cleanly: its host is at once not alive (audits and the fleet
        say so, a restarted worker registers without waiting for the claim to lapse).
        Its targets stay registered: the fleet still lists them, with the worker down."""
        return bool(self._release(keys=[self._k("hostowner", host), self._k("host", host)], args=[instance]))

    def _heartbeat_record(self, host: str, ttl: int) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.r.set(self._k("host", host), json.dumps({"host": host, "heartbeat": now}), ex=ttl)

    def publish_target(self, entry: dict[str, Any]) -> None:
        """One target's inventory entry (after it was deployed or recovered): one round
        trip, and the cost does not grow with the number of targets on the host. Its
        labels come from the config the worker registered with, so none can have gone
        stale since; registration removes the stale ones."""
        pipe = self.r.pipeline(transaction=True)
        self._queue_target(pipe, entry, None)
        pipe.execute()

    def _queue_target(self, pipe: Any, entry: dict[str, Any], old: dict[str, Any] | None) -> None:
        host, name = entry["host"], entry["target"]
        addr = f"{host}/{name}"
        pipe.set(self._k("inventory", addr), json.dumps({**entry, "address": addr}))
        pipe.sadd(self._k("hosttargets", host), name)
        pipe.sadd(self._k("name", name), host)
        for label in set((old or {}).get("labels") or []) - set(entry.get("labels") or []):
            pipe.srem(self._k("label", label), addr)
        for label in entry.get("labels") or []:
            pipe.sadd(self._k("label", label), addr)

    def forget_host(self, host: str) -> int:
        """Drop a dead host from the registry; returns how many targets it had."""
        if self.host_alive(host) or self.r.exists(self._k("hostowner", host)):
            raise HostTaken(f"host {host!r} has a live worker: stop it first")
        names = sorted(self.r.smembers(self._k("hosttargets", host)))
        if not names and not self.r.sismember(self._k("hosts"), host):
            raise UnknownTarget(f"no host {host!r} in the registry")
        raws = self.r.mget([self._k("inventory", f"{host}/{n}") for n in names]) if names else []
        pipe = self.r.pipeline(transaction=True)
        for name, raw in zip(names, raws, strict=True):
            addr = f"{host}/{name}"
            pipe.srem(self._k("name", name), host)
            for label in (_loads(raw) or {}).get("labels") or []:
                pipe.srem(self._k("label", label), addr)
            pipe.delete(self._k("inventory", addr), self._k("audit", addr))
        pipe.delete(self._k("hosttargets", host))
        pipe.srem(self._k("hosts"), host)
        pipe.execute()
        return len(names)

    def resolve(self, target: str) -> tuple[str, str]:
        """``HOST/NAME`` or a bare ``NAME`` -> (host, name); UnknownTarget / AmbiguousTarget."""
        host, sep, name = target.partition("/")
        if sep:
            if not self.r.sismember(self._k("hosttargets", host), name):
                known = sorted(self.r.smembers(self._k("hosttargets", host)))
                where = f"host {host!r} has registered: {', '.join(known)}" if known else \
                    f"no worker of host {host!r} has registered (is it running?)"
                raise UnknownTarget(f"unknown target {target!r}: {where}")
            return host, name
        hosts = sorted(self.r.smembers(self._k("name", target)))
        if not hosts:
            raise UnknownTarget(f"unknown target {target!r}: no worker has registered it (is its worker running "
                                "with a config that defines it?)")
        if len(hosts) > 1:
            raise AmbiguousTarget(f"target {target!r} is defined on {len(hosts)} hosts; say which: "
                                  + ", ".join(f"{h}/{target}" for h in hosts))
        return hosts[0], target

    def host_alive(self, host: str) -> bool:
        return bool(self.r.exists(self._k("host", host)))

    def fleet(self) -> list[dict[str, Any]]:
        """Every registered target, by host: its last inventory and whether its worker lives."""
        rows = []
        for host in sorted(self.r.smembers(self._k("hosts"))):
            alive = self.host_alive(host)
            names = sorted(self.r.smembers(self._k("hosttargets", host)))
            if not names:
                continue
            raws = self.r.mget([self._k("inventory", f"{host}/{n}") for n in names])
            for raw in raws:
                entry = _loads(raw)
                if entry:
                    rows.append({**entry, "worker_alive": alive})
        return rows

    # -- rollouts and audits ----------------------------------------------------------
    def put_rollout(self, data: dict[str, Any]) -> None:
        self.r.set(self._k("rollout", data["rollout_id"]), json.dumps(data), ex=RECORD_TTL)

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        return _loads(self.r.get(self._k("rollout", rollout_id)))

    def put_audit(self, address: str, data: dict[str, Any]) -> None:
        self.r.set(self._k("audit", address), json.dumps(data), ex=RECORD_TTL)

    def audits(self) -> list[dict[str, Any]]:
        addrs = [f"{row['host']}/{row['target']}" for row in self.fleet()]
        raws = self.r.mget([self._k("audit", a) for a in addrs]) if addrs else []
        return [d for d in (_loads(r) for r in raws) if d]
