"""Per-file records in Redis.

One hash per file (``qp:f:<key>``) holds the record; every change is one Lua script that
compares the record's generation (and, for transfers, its lease) and then sets, so two
workers, a sweep and a re-upload can never overwrite each other's newer state. A sorted set
per state (``qp:s:<state>``, scored by last change) lets sweeps look only at what is stuck.
Each node has a schedule (``qp:drop:<node>``) of local copies it may drop, and when.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import hiredis
import redis

from qproxy.errors import LeaseLost, StateUnavailable

State = Literal["pending", "local", "queued", "transferring", "remote", "failed", "deleted"]
STATES: tuple[State, ...] = (
    "pending",
    "local",
    "queued",
    "transferring",
    "remote",
    "failed",
    "deleted",
)
# States in which the only copy is on the origin node's disk.
LOCAL_STATES = frozenset({"local", "queued", "transferring", "failed"})

PREFIX = "qp:"

# A record's fields are stored under one-letter names, times to the millisecond and the
# SHA-256 as base64: ~300 bytes of Redis memory per record instead of ~430 (make bench,
# "state at scale"). Code uses the long names; only this module sees the short ones.
FIELDS = {
    "state": "s",
    "gen": "g",
    "node": "n",
    "node_url": "u",
    "size": "z",
    "sha256": "h",
    "filename": "f",
    "content_type": "t",
    "created": "c",
    "updated": "m",
    "attempts": "a",
    "error": "e",
    "lease": "l",
    "lease_until": "d",
    "remote_at": "r",
    "has_local": "L",
    "has_remote": "R",
    "version": "v",
    "hold": "H",
    "stale": "x",
    "meta": "M",
}
_LONG = {short.encode(): name.encode() for name, short in FIELDS.items()}


def timestamp(t: float) -> str:
    """A time as stored: seconds with milliseconds, rounded down (never later than ``t``:
    a drop scheduled for now is due now, not half a millisecond from now)."""
    ms = int(t * 1000)
    if ms / 1000 > t:  # t * 1000 rounded up in floating point
        ms -= 1
    return f"{ms // 1000}.{ms % 1000:03d}"


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

# A deleted record goes once neither a local nor a remote copy is left.
_FORGET = """
local h = redis.call('HMGET', KEYS[1], 's', 'L', 'R')
if h[1] ~= 'deleted' or h[2] == '1' or h[3] == '1' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. 's:deleted', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class FileRecord:
    """What Redis knows about one file."""

    key: str
    state: State
    gen: int
    node: str = ""
    node_url: str = ""
    size: int = 0
    sha256: str = ""
    filename: str = ""
    content_type: str = "application/octet-stream"
    created: float = 0.0
    updated: float = 0.0
    attempts: int = 0
    error: str = ""
    lease: str = ""
    lease_until: float = 0.0
    remote_at: float = 0.0
    has_local: bool = True
    has_remote: bool = False
    version: int = 1
    hold: bool = False  # stored with delayed=True: transferred only when asked
    stale: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, key: str, raw: Mapping[bytes, bytes]) -> FileRecord:
        h = {_LONG.get(k, k): v for k, v in raw.items()}
        get = h.get
        sha = get(b"sha256", b"")
        return cls(
            key=key,
            state=cast(State, get(b"state", b"pending").decode()),
            gen=int(get(b"gen", 0)),
            node=get(b"node", b"").decode(),
            node_url=get(b"node_url", b"").decode(),
            size=int(get(b"size", 0) or 0),
            sha256=base64.urlsafe_b64decode(sha + b"=").hex() if len(sha) == 43 else sha.decode(),
            filename=get(b"filename", b"").decode("utf-8", "replace"),
            content_type=get(b"content_type", b"").decode("utf-8", "replace")
            or "application/octet-stream",
            created=float(get(b"created", 0) or 0),
            updated=float(get(b"updated", 0) or 0),
            attempts=int(get(b"attempts", 0) or 0),
            error=get(b"error", b"").decode("utf-8", "replace"),
            lease=get(b"lease", b"").decode(),
            lease_until=float(get(b"lease_until", 0) or 0),
            remote_at=float(get(b"remote_at", 0) or 0),
            has_local=get(b"has_local", b"1") == b"1",
            has_remote=get(b"has_remote", b"0") == b"1",
            version=int(get(b"version", 1) or 1),
            hold=get(b"hold", b"0") == b"1",
            stale=tuple(n for n in get(b"stale", b"").decode().split(",") if n),
            meta=json.loads(h[b"meta"]) if get(b"meta") else {},
        )

    @property
    def object(self) -> str:
        """This version's S3 object name (before the prefix): each version has its own, so a
        stale upload of an older version can never overwrite the newest bytes."""
        return self.key if self.version <= 1 else f"{self.key}~v{self.version}"

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out.pop("lease")
        out["object"] = self.object
        return out


class StateStore:
    """Records in one Redis database."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._forget = client.register_script(_FORGET)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> StateStore:
        client = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30, **kwargs
        )
        return cls(client)

    def record_key(self, key: str) -> str:
        return f"{self.prefix}f:{key}"

    def get(self, key: str) -> FileRecord | None:
        try:
            raw = cast(dict[bytes, bytes], self.redis.hgetall(self.record_key(key)))
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        return FileRecord.from_hash(key, raw) if raw else None

    def create(
        self, key: str, state: State, fields: Mapping[str, Any], *, replace: bool = False
    ) -> int:
        """Create a record (or a new version of a deleted one, or with ``replace`` of any).

        Returns its generation; raises :class:`LeaseLost` if the key is taken.
        """
        now = time.time()
        args: list[Any] = [self.prefix, key, state, timestamp(now), "1" if replace else ""]
        args += _flatten({"created": now, **fields})
        try:
            ok, value = self._create(keys=[self.record_key(key)], args=args)
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        if not ok:
            raise LeaseLost(f"{key} already exists in state {value.decode()}")
        return int(value)

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
        now = time.time()
        args: list[Any] = [
            self.prefix,
            key,
            to,
            timestamp(now),
            "" if gen is None else str(gen),
            ",".join(from_states),
            lease or "",
            drop[0] if drop else "",
            timestamp(drop[1]) if drop else "",
        ]
        args += _flatten(fields or {})
        try:
            result = self._transition(keys=[self.record_key(key)], args=args)
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        if not result[0]:
            why = result[1].decode()
            detail = (
                f" (now {result[2].decode()}, generation {result[3].decode()})"
                if len(result) > 2
                else ""
            )
            raise LeaseLost(f"{key}: {why} check failed moving to {to}{detail}")
        return int(result[1])

    def keys_in_state(
        self, state: State, *, older_than: float | None = None, limit: int = 1000
    ) -> list[str]:
        """Keys in ``state``, oldest change first (for ``remote``: any order, by a scan).

        Every state but ``remote`` has an index sorted by last change, so sweeps cost what is
        stuck. Remote files, the vast majority, are not indexed: it halves the memory a
        record costs, and only listings ask for them.
        """
        if state == "remote":
            return self._scan_state("remote", limit)
        top = "+inf" if older_than is None else repr(older_than)
        try:
            members = self.redis.zrangebyscore(
                f"{self.prefix}s:{state}", "-inf", top, start=0, num=limit
            )
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        return [m.decode() for m in cast(list[bytes], members)]

    def _scan_state(self, state: State, limit: int) -> list[str]:
        found: list[str] = []
        start = len(self.prefix) + 2
        try:
            for name in self.redis.scan_iter(match=f"{self.prefix}f:*", count=1000):
                if self.redis.hget(name, FIELDS["state"]) == state.encode():
                    found.append(name.decode()[start:])
                    if len(found) >= limit:
                        break
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        return found

    def count(self, state: State) -> int:
        return int(self.redis.zcard(f"{self.prefix}s:{state}"))

    def due_drops(self, node: str, *, now: float | None = None, limit: int = 100) -> list[str]:
        top = repr(time.time() if now is None else now)
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
        self.redis.zrem(f"{self.prefix}drop:{node}", key)

    def forget(self, key: str) -> bool:
        """Remove a deleted record once no copy is left anywhere."""
        try:
            return bool(self._forget(keys=[self.record_key(key)], args=[self.prefix, key]))
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc

    def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of ``keys`` have a record (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.record_key(key))
        try:
            return [bool(n) for n in pipe.execute()]
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc

    def try_lock(self, name: str, seconds: float) -> bool:
        """A best-effort lock that expires by itself (one sweep at a time across nodes)."""
        try:
            return bool(
                self.redis.set(f"{self.prefix}lock:{name}", "1", nx=True, px=int(seconds * 1000))
            )
        except redis.RedisError as exc:
            raise StateUnavailable(str(exc)) from exc

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False


class AsyncStateReader:
    """Reads records from an event loop (the resolver), without a thread per lookup."""

    def __init__(self, url: str, *, prefix: str = PREFIX) -> None:
        from qproxy.resp import PipelinedRedis

        self.prefix = prefix
        self.redis = PipelinedRedis(url, timeout=5, connect_timeout=2)

    async def get(self, key: str) -> FileRecord | None:
        from qproxy.resp import RedisUnavailable

        try:
            flat = await self.redis.call("HGETALL", self.prefix + "f:" + key)
        except (RedisUnavailable, hiredis.ReplyError) as exc:
            raise StateUnavailable(str(exc)) from exc
        if not flat:
            return None
        return FileRecord.from_hash(key, dict(zip(flat[::2], flat[1::2], strict=True)))


def _flatten(fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        if isinstance(value, dict):
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, float):
            value = timestamp(value)
        elif name == "sha256" and isinstance(value, str) and len(value) == 64:
            value = base64.urlsafe_b64encode(bytes.fromhex(value)).rstrip(b"=").decode()
        out += [FIELDS.get(name, name), "" if value is None else str(value)]
    return out
