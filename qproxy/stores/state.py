"""Per-file records in Redis.

One hash per file (``qp:f:<key>``) holds the record; every change is one Lua script that
compares the record's generation (and, for transfers, its lease) and then sets, so two
workers, a sweep and a re-upload can never overwrite each other's newer state. A sorted set
per state (``qp:s:<state>``, scored by last change) lets sweeps look only at what is stuck.
Each node has a schedule (``qp:drop:<node>``) of local copies it may drop, and when.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import hiredis
import redis
from redis.sentinel import Sentinel

from qproxy import metrics
from qproxy.core.record import FIELDS, FileRecord, State, encode_fields, timestamp
from qproxy.errors import KeyExists, LeaseLost, StateUnavailable
from qproxy.redis_url import is_sentinel, parse_sentinel
from qproxy.stores.resp import PipelinedRedis

PREFIX = "qp:"

# ARGV: prefix, key, state, now, replace '1'|'', then field/value pairs.
_CREATE = """
local cur = redis.call('HGET', KEYS[1], 's')
if cur and cur ~= 'deleted' and ARGV[5] ~= '1' then return {0, cur} end
local version = 1
local stale = ''
if cur then
  -- A new version of the key (a re-upload, or a deleted key used again): new fields, the
  -- generation keeps counting up (fencing), and the old version's S3 object (each version
  -- has its own) is remembered, to be removed once the new version is safe in S3.
  local old = redis.call('HMGET', KEYS[1], 'g', 'v', 'x')
  local oldversion = tonumber(old[2]) or 1
  version = oldversion + 1
  stale = old[3] or ''
  if cur ~= 'local' and cur ~= 'queued' then
    local oldname = ARGV[2]
    if oldversion > 1 then oldname = ARGV[2] .. '~v' .. oldversion end
    if stale == '' then stale = oldname else stale = stale .. ',' .. oldname end
  end
  redis.call('ZREM', ARGV[1] .. 's:' .. cur, ARGV[2])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'g', old[1])
end
local gen = redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 's', ARGV[3], 'm', ARGV[4])
if version > 1 then redis.call('HSET', KEYS[1], 'v', version) end
if stale ~= '' then redis.call('HSET', KEYS[1], 'x', stale) end
if ARGV[3] ~= 'remote' then redis.call('ZADD', ARGV[1] .. 's:' .. ARGV[3], ARGV[4], ARGV[2]) end
return {1, gen}
"""

# ARGV: prefix, key, new state, now, expected gen|'', allowed states 'a,b'|'', lease|'',
#       drop node|'', drop due|'', then field/value pairs ('' values are deleted).
_TRANSITION = """
local cur = redis.call('HMGET', KEYS[1], 's', 'g', 'l')
if not cur[1] then return {0, 'missing'} end
if ARGV[5] ~= '' and cur[2] ~= ARGV[5] then return {0, 'generation', cur[1], cur[2]} end
if ARGV[6] ~= '' and not string.find(',' .. ARGV[6] .. ',', ',' .. cur[1] .. ',', 1, true) then
  return {0, 'state', cur[1], cur[2]}
end
if ARGV[7] ~= '' and cur[3] ~= ARGV[7] then return {0, 'lease', cur[1], cur[2]} end
local gen = redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('HSET', KEYS[1], 's', ARGV[3], 'm', ARGV[4])
for i = 10, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if cur[1] ~= ARGV[3] then redis.call('ZREM', ARGV[1] .. 's:' .. cur[1], ARGV[2]) end
if ARGV[3] ~= 'remote' then redis.call('ZADD', ARGV[1] .. 's:' .. ARGV[3], ARGV[4], ARGV[2]) end
if ARGV[8] ~= '' then redis.call('ZADD', ARGV[1] .. 'drop:' .. ARGV[8], ARGV[9], ARGV[2]) end
return {1, gen}
"""

# A transfer's start: read the record and, unless another run's lease is live or it is past
# needing one, take it in the same step (no read-then-set race, one round trip).
# ARGV: prefix, key, now, then field/value pairs set on the claimed record.
_CLAIM = """
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
if s == 'transferring' and (tonumber(redis.call('HGET', KEYS[1], 'd')) or 0) > tonumber(ARGV[3])
then return {'leased', redis.call('HGETALL', KEYS[1])} end
if s ~= 'local' and s ~= 'queued' and s ~= 'failed' and s ~= 'transferring' then
  return {'settled', redis.call('HGETALL', KEYS[1])}
end
redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('HINCRBY', KEYS[1], 'a', 1)
redis.call('HSET', KEYS[1], 's', 'transferring', 'm', ARGV[3])
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if s ~= 'transferring' then redis.call('ZREM', ARGV[1] .. 's:' .. s, ARGV[2]) end
redis.call('ZADD', ARGV[1] .. 's:transferring', ARGV[3], ARGV[2])
return {'claimed', redis.call('HGETALL', KEYS[1])}
"""

# A deleted record goes once neither a local nor a remote copy is left.
_FORGET = """
local h = redis.call('HMGET', KEYS[1], 's', 'L', 'R')
if h[1] ~= 'deleted' or h[2] == '1' or h[3] == '1' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. 's:deleted', ARGV[2])
return 1
"""


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """The one place redis-py's errors become :class:`StateUnavailable`."""
    try:
        yield
    except redis.RedisError as exc:
        metrics.redis_error()
        raise StateUnavailable(f"Redis: {exc}") from exc


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``: redis-py's URLs, or ``redis+sentinel://`` (the master, found
    through the sentinels and found again after a failover)."""
    options: dict[str, Any] = {
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
        "health_check_interval": 30,
        **kwargs,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed in redis 8.2
        list(parsed.sentinels),
        sentinel_kwargs={
            "socket_timeout": 1,
            "socket_connect_timeout": 1,
            **({"password": parsed.sentinel_password} if parsed.sentinel_password else {}),
        },
        **{k: v for k, v in options.items() if k != "health_check_interval"},
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        parsed.master,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **options,
    )
    return client


class StateStore:
    """Records in one Redis database."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._forget = client.register_script(_FORGET)
        self._claim = client.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> StateStore:
        return cls(redis_client(url, **kwargs))

    def epoch(self) -> str:
        """Which history of the data this server holds: a replica promoted by a failover
        (or a Redis restarted without its data) starts a new one, and may lack the last
        writes the old one acknowledged (see :func:`qproxy.worker.sweep.replay_journal`)."""
        with redis_errors():
            info = self.redis.info("replication")
        return str(info.get("master_replid", ""))

    def record_key(self, key: str) -> str:
        return f"{self.prefix}f:{key}"

    def get(self, key: str) -> FileRecord | None:
        with redis_errors():
            raw = cast(dict[bytes, bytes], self.redis.hgetall(self.record_key(key)))
        return FileRecord.from_hash(key, raw) if raw else None

    def create(
        self, key: str, state: State, fields: Mapping[str, Any], *, replace: bool = False
    ) -> int:
        """Create a record (or a new version of a deleted one, or with ``replace`` of any).

        Returns its generation; raises :class:`KeyExists` if the key is taken.
        """
        now = time.time()
        args = self._create_args(key, state, {"created": now, **fields}, replace, now)
        with redis_errors():
            ok, value = self._create(keys=[self.record_key(key)], args=args)
        if not ok:
            raise KeyExists(f"{key} already exists in state {value.decode()}")
        return int(value)

    def _create_args(
        self, key: str, state: State, fields: Mapping[str, Any], replace: bool, now: float
    ) -> list[Any]:
        args: list[Any] = [self.prefix, key, state, timestamp(now), "1" if replace else ""]
        return args + encode_fields(fields)

    def transition(
        self,
        key: str,
        to: State,
        *,
        gen: int | None = None,
        from_states: Iterable[State] = (),
        lease: str | None = None,
        fields: Mapping[str, Any] | None = None,
        drop: tuple[str, float] | None = None,
    ) -> int:
        """Move ``key`` to state ``to`` if its generation, state and lease match.

        Returns the new generation; raises :class:`LeaseLost` when the record moved on.
        ``drop`` schedules the node's local copy for removal at a time.
        """
        args = self._transition_args(key, to, gen, from_states, lease, fields, drop)
        with redis_errors():
            result = self._transition(keys=[self.record_key(key)], args=args)
        if not result[0]:
            why = result[1].decode()
            detail = (
                f" (now {result[2].decode()}, generation {result[3].decode()})"
                if len(result) > 2
                else ""
            )
            raise LeaseLost(f"{key}: {why} check failed moving to {to}{detail}")
        return int(result[1])

    def _transition_args(
        self,
        key: str,
        to: State,
        gen: int | None,
        from_states: Iterable[State],
        lease: str | None,
        fields: Mapping[str, Any] | None,
        drop: tuple[str, float] | None,
        now: float = 0.0,
    ) -> list[Any]:
        args: list[Any] = [
            self.prefix,
            key,
            to,
            timestamp(now or time.time()),
            "" if gen is None else str(gen),
            ",".join(from_states),
            lease or "",
            drop[0] if drop else "",
            timestamp(drop[1]) if drop else "",
        ]
        return args + encode_fields(fields or {})

    def claim(
        self, key: str, fields: Mapping[str, Any], *, now: float | None = None
    ) -> tuple[str, FileRecord | None]:
        """Start a transfer of ``key``: move it to ``transferring`` (a generation and an
        attempt more, ``fields`` set, e.g. the lease) unless another run's lease on it is
        still live (``leased``) or it needs no transfer (``settled``: remote, deleted, still
        pending). One round trip. Returns the outcome (``claimed``, ``leased``, ``settled``,
        ``missing``) and the record as it is now."""
        at = time.time() if now is None else now
        args = [self.prefix, key, timestamp(at), *encode_fields(fields)]
        with redis_errors():
            answer = self._claim(keys=[self.record_key(key)], args=args)
        outcome = answer[0].decode()
        if len(answer) < 2:
            return outcome, None
        return outcome, FileRecord.from_flat(key, answer[1])

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Bulk]:
        """Many creates and transitions in one round trip, unchecked (for loading records
        in bulk: benchmarks, imports). Sent when the block ends."""
        batch = Bulk(self, self.redis.pipeline(transaction=False))
        yield batch
        with redis_errors():
            batch.pipe.execute()

    def keys_in_state(
        self,
        state: State,
        *,
        older_than: float | None = None,
        limit: int = 1000,
        newest: bool = False,
    ) -> list[str]:
        """Keys in ``state``, oldest change first (``newest``: latest first; for ``remote``:
        any order, by a scan).

        Every state but ``remote`` has an index sorted by last change, so sweeps cost what is
        stuck. Remote files, the vast majority, are not indexed: it halves the memory a
        record costs, and only listings ask for them.
        """
        if state == "remote":
            return self._scan_state("remote", limit)
        top = "+inf" if older_than is None else repr(older_than)
        with redis_errors():
            if newest:  # the latest changes first (listings)
                members = self.redis.zrevrangebyscore(
                    f"{self.prefix}s:{state}", top, "-inf", start=0, num=limit
                )
            else:
                members = self.redis.zrangebyscore(
                    f"{self.prefix}s:{state}", "-inf", top, start=0, num=limit
                )
        return [m.decode() for m in cast(list[bytes], members)]

    def _scan_state(self, state: State, limit: int) -> list[str]:
        found: list[str] = []
        start = len(self.prefix) + 2
        with redis_errors():
            for name in self.redis.scan_iter(match=f"{self.prefix}f:*", count=1000):
                if self.redis.hget(name, FIELDS["state"]) == state.encode():
                    found.append(name.decode()[start:])
                    if len(found) >= limit:
                        break
        return found

    def keys_under(self, prefix: str, *, limit: int = 100_000) -> list[str]:
        """Keys that start with ``prefix`` and have a live record (not deleted, not still
        being written), by a scan: for listings (``QueuedStorage.listdir``), not hot paths."""
        start = len(self.prefix) + 2
        found: list[str] = []
        with redis_errors():
            names = [
                n.decode()[start:]
                for n in self.redis.scan_iter(match=f"{self.prefix}f:{prefix}*", count=1000)
            ]
        for key, state in zip(names, self.states(names), strict=True):
            if state is not None and state not in ("deleted", "pending"):
                found.append(key)
                if len(found) >= limit:
                    break
        return sorted(found)

    def census(self, states: Iterable[State]) -> dict[State, tuple[int, float | None]]:
        """For each of ``states`` (indexed ones: not ``remote``): how many records, and
        when the one that changed longest ago last changed. One round trip."""
        wanted = list(states)
        pipe = self.redis.pipeline(transaction=False)
        for state in wanted:
            pipe.zcard(f"{self.prefix}s:{state}")
            pipe.zrange(f"{self.prefix}s:{state}", 0, 0, withscores=True)
        with redis_errors():
            answers = pipe.execute()
        out: dict[State, tuple[int, float | None]] = {}
        for i, state in enumerate(wanted):
            first = answers[2 * i + 1]
            out[state] = (int(answers[2 * i]), float(first[0][1]) if first else None)
        return out

    def count(self, state: State) -> int:
        with redis_errors():
            return int(self.redis.zcard(f"{self.prefix}s:{state}"))

    def schedule_drop(self, node: str, key: str, when: float) -> None:
        """Let ``node`` remove its local copy of ``key`` from ``when`` on."""
        with redis_errors():
            self.redis.zadd(f"{self.prefix}drop:{node}", {key: when})

    def due_drops(self, node: str, *, now: float | None = None, limit: int = 100) -> list[str]:
        top = repr(time.time() if now is None else now)
        with redis_errors():
            members = self.redis.zrangebyscore(
                f"{self.prefix}drop:{node}", "-inf", top, start=0, num=limit
            )
        return [m.decode() for m in cast(list[bytes], members)]

    def drop_done(self, node: str, key: str, record: FileRecord | None) -> None:
        """The node no longer holds ``key``: unschedule it and mark the record."""
        version = record.version if record is not None else None
        for _ in range(5):
            # Only while it is the same upload, still remote or deleted (a re-upload keeps
            # its copy). Another change to the record meanwhile (a purge clearing the S3
            # copy, the janitor of another process) is no reason to give up: read it again.
            if record is None or record.state not in ("remote", "deleted"):
                break
            if record.version != version:
                break
            try:
                self.transition(
                    key,
                    record.state,
                    gen=record.gen,
                    from_states=(record.state,),
                    fields={"has_local": "0"},
                )
            except LeaseLost:
                record = self.get(key)
                continue
            if record.state == "deleted":
                self.forget(key)
            break
        # Unscheduled last: had this gone first, a lost race above left has_local set on a
        # record nobody would look at again (a deleted record then never went away).
        with redis_errors():
            self.redis.zrem(f"{self.prefix}drop:{node}", key)

    # -- the nodes of the cluster ---------------------------------------------------------

    def register_node(self, node: str, info: Mapping[str, Any]) -> None:
        """Record ``node`` (its URL, when last seen, whether it is draining)."""
        with redis_errors():
            self.redis.hset(f"{self.prefix}nodes", node, json.dumps(dict(info)))

    def nodes(self) -> dict[str, dict[str, Any]]:
        with redis_errors():
            raw = cast(dict[bytes, bytes], self.redis.hgetall(f"{self.prefix}nodes"))
        out: dict[str, dict[str, Any]] = {}
        for name, value in raw.items():
            with contextlib.suppress(ValueError):
                out[name.decode()] = json.loads(value)
        return out

    def deregister_node(self, node: str) -> None:
        with redis_errors():
            self.redis.hdel(f"{self.prefix}nodes", node)

    def forget(self, key: str) -> bool:
        """Remove a deleted record once no copy is left anywhere."""
        with redis_errors():
            return bool(self._forget(keys=[self.record_key(key)], args=[self.prefix, key]))

    def states(self, keys: list[str]) -> list[State | None]:
        """The state of each of ``keys`` (None: no record), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(self.record_key(key), FIELDS["state"])
        with redis_errors():
            found = pipe.execute()
        return [None if v is None else cast(State, v.decode()) for v in found]

    def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of ``keys`` have a record (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.record_key(key))
        with redis_errors():
            return [bool(n) for n in pipe.execute()]

    def try_lock(self, name: str, seconds: float) -> bool:
        """A best-effort lock that expires by itself (one sweep at a time across nodes)."""
        with redis_errors():
            return bool(
                self.redis.set(f"{self.prefix}lock:{name}", "1", nx=True, px=int(seconds * 1000))
            )

    def ping(self) -> bool:
        try:
            with redis_errors():
                return bool(self.redis.ping())
        except StateUnavailable:
            return False


class Bulk:
    """Creates and transitions queued on a pipeline (see :meth:`StateStore.bulk`)."""

    def __init__(self, store: StateStore, pipe: Any) -> None:
        self.store = store
        self.pipe = pipe

    def create(
        self, key: str, state: State, fields: Mapping[str, Any], *, now: float = 0.0
    ) -> None:
        """A new record with exactly ``fields`` (no ``created`` is added)."""
        store = self.store
        args = store._create_args(key, state, fields, False, now or time.time())
        store._create(keys=[store.record_key(key)], args=args, client=self.pipe)

    def transition(
        self, key: str, to: State, *, fields: Mapping[str, Any] | None = None, now: float = 0.0
    ) -> None:
        store = self.store
        args = store._transition_args(key, to, None, (), None, fields, None, now)
        store._transition(keys=[store.record_key(key)], args=args, client=self.pipe)


class AsyncStateReader:
    """Reads records from an event loop (the resolver), without a thread per lookup."""

    def __init__(self, url: str, *, prefix: str = PREFIX, tracking: bool = True) -> None:
        self.prefix = prefix
        # Records are remembered until Redis says they changed (see qproxy.stores.resp).
        self.redis = PipelinedRedis(url, timeout=5, connect_timeout=2, tracking=tracking)

    async def get(self, key: str) -> FileRecord | None:
        def parse(flat: list[bytes]) -> FileRecord | None:
            if not flat:
                return None
            return FileRecord.from_flat(key, flat)

        name = self.prefix + "f:" + key
        try:
            return await self.redis.tracked(name, parse, "HGETALL", name)
        except hiredis.ReplyError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc
