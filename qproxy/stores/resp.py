"""A small pipelined Redis client for the resolver's one hot read.

redis.asyncio checks a connection out of its pool for every command and waits for the
answer before the connection serves anyone else: measured ~80 us per HGETALL on loopback,
which capped the resolver at ~5.5k req/s. Here every concurrent request writes its command
to one shared connection at once and the answers come back in order (Redis answers a
connection's commands in the order they arrive), parsed by hiredis: ~6 us per lookup under
load. Everything else in qproxy uses redis-py. Every failure (no connection, a lost
connection, no answer in time) is a :class:`qproxy.errors.StateUnavailable`.

Reads made with :meth:`PipelinedRedis.tracked` are remembered, with Redis's server-assisted
client-side caching: ``CLIENT TRACKING ON REDIRECT`` to a second connection subscribed to
``__redis__:invalidate``, on which Redis names every key it changes after this client read
it. A hot key then costs no round trip (presigned redirects: ~+60% req/s); a change made
by anyone is seen as soon as its invalidation arrives. Whatever could lose an invalidation
(either connection lost) forgets everything, and nothing is kept longer than a few
seconds even so.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from qproxy.errors import StateUnavailable
from qproxy.redis_url import SentinelURL, is_sentinel, parse_sentinel

log = logging.getLogger("qproxy.resolver")
T = TypeVar("T")
INVALIDATIONS = b"__redis__:invalidate"
# A remembered read is used for at most this long (a safety net: invalidations say when a
# key changed; this bounds what a silently stuck invalidation connection could cost).
TRACKED_SECONDS = 5.0
TRACKED_MAX = 65536  # reads remembered per connection (all forgotten when it is full)
_ABSENT = object()


class _Tracking:
    """The reads remembered on one tracked connection, forgotten as Redis says they change.

    A read in flight when its key's invalidation arrives is not remembered: the two come
    on two connections, so the answer may be older than the change."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[Any, float]] = {}
        self.inflight: dict[bytes, object] = {}

    def get(self, key: bytes) -> Any:
        entry = self.entries.get(key)
        if entry is None or entry[1] < time.monotonic():
            return _ABSENT
        return entry[0]

    def start(self, key: bytes) -> object:
        token = self.inflight[key] = object()
        return token

    def finish(self, key: bytes, token: object, value: Any) -> None:
        if self.inflight.get(key) is not token:
            return  # changed meanwhile (or read again since): not remembered
        del self.inflight[key]
        if len(self.entries) >= TRACKED_MAX:
            self.entries.clear()
        self.entries[key] = (value, time.monotonic() + TRACKED_SECONDS)

    def invalidate(self, message: Any) -> None:
        """A pub/sub message from ``__redis__:invalidate``: these keys changed (None: all)."""
        if not isinstance(message, list) or len(message) < 3 or message[0] != b"message":
            return
        keys = message[2]
        if keys is None:  # FLUSHALL, FLUSHDB, or Redis dropped its tracking table
            self.forget()
            return
        for key in keys:
            self.entries.pop(key, None)
            self.inflight.pop(key, None)

    def forget(self) -> None:
        self.entries.clear()
        self.inflight.clear()


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.WriteTransport | None = None
        self.timeout = timeout
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []
        # A subscribed connection: what Redis sends unasked goes here.
        self.on_push: Callable[[Any], None] | None = None
        # Called once when the connection goes (the other one of a tracked pair closes).
        self.on_lost: Callable[[], None] | None = None
        self.tracking: _Tracking | None = None
        self.subscriber: _Protocol | None = None  # a tracked connection's invalidations
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if self.fd >= 0:
            # Asking whether anything came: a poll() is ~4x cheaper than a failed read.
            self._ready = select.poll()
            self._ready.register(self.fd, select.POLLIN)

    def catch_up(self, key: bytes) -> None:
        """Before a remembered read of ``key`` is used: the invalidations already here."""
        tracking, subscriber = self.tracking, self.subscriber
        if tracking is not None and subscriber is not None and key in tracking.entries:
            subscriber.poll()

    def poll(self) -> None:
        """Take what has already arrived, now (a subscriber's invalidations), rather than
        when the event loop next looks: a change whose writer already has its answer is
        then seen by a read that comes after it (a key's: Redis sends its invalidation
        first; FLUSHALL's can come microseconds after its answer). The socket is
        non-blocking."""
        while not self.closed and self.fd >= 0 and self._ready.poll(0):
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._abort(f"connection lost: {exc}")
                return
            if not data:
                self._abort("connection closed by server")
                return
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            self._dispatch()
        except hiredis.ProtocolError as exc:  # not Redis speaking: drop the connection
            self._abort(f"Redis protocol error: {exc}")

    def _dispatch(self) -> None:
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            if not waiters:
                if self.on_push is not None:
                    self.on_push(reply)
                    continue
                self._abort("unexpected reply")  # nobody asked: the stream is out of step
                return
            fut = waiters.popleft()[0]
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(StateUnavailable(f"connection lost: {exc or 'closed by server'}"))

    def close(self) -> None:
        """Closed at once: nothing more is sent or answered on it."""
        if not self.closed:
            self._abort("closed")

    def _fail(self, exc: Exception) -> None:
        if self.tracking is not None:
            self.tracking.forget()
            self.tracking = None
        lost, self.on_lost = self.on_lost, None
        if lost is not None:
            lost()
        while self.waiters:
            fut = self.waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self, why: str) -> None:
        self.closed = True
        self._fail(StateUnavailable(why))
        if self.transport is not None:
            self.transport.abort()

    def call(self, payload: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.closed or self.transport is None:
            fut.set_exception(StateUnavailable("not connected"))
            return fut
        self.waiters.append((fut, time.monotonic() + self.timeout))
        # Commands issued in the same turn of the event loop leave in one write.
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(payload)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout / 4, self._check)
        return fut

    def _flush(self) -> None:
        payload, self._outbox = b"".join(self._outbox), []
        if self.transport is not None and not self.closed:
            self.transport.write(payload)

    def _check(self) -> None:
        # One timer per connection, not one per command: the oldest unanswered command
        # decides, since Redis answers in order.
        self._timer = None
        if not self.waiters:
            return
        if self.waiters[0][1] <= time.monotonic():
            self._abort(f"no answer from Redis in {self.timeout:g} s")
            return
        self._timer = asyncio.get_running_loop().call_later(self.timeout / 4, self._check)


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class PipelinedRedis:
    """One connection, shared by every coroutine of one event loop; reconnects on demand."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        tracking: bool = False,
    ) -> None:
        self.tracking = tracking  # remember :meth:`tracked` reads (client-side caching)
        self._untracked_said = False
        self.sentinel: SentinelURL | None = None
        if is_sentinel(url):
            # The master is asked of the sentinels at every (re)connection: after a failover
            # the lost connection is made again to the new master.
            self.sentinel = parse_sentinel(url)
            self.options: dict[str, Any] = {
                "username": self.sentinel.username,
                "password": self.sentinel.password,
                "db": self.sentinel.db,
            }
        else:
            self.options = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # One connection per event loop (a server may run one loop per thread).
        self._protocols: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Protocol] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    async def call(self, *args: str | bytes | int) -> Any:
        loop = asyncio.get_running_loop()
        protocol = self._protocols.get(loop)
        if protocol is None or protocol.closed:
            protocol = await self._connect(loop)
        return await protocol.call(pack(*args))

    async def tracked(self, key: str, parse: Callable[[Any], T], *args: str | bytes | int) -> T:
        """``parse`` of the answer to the command ``args``, which reads the one key ``key``:
        remembered until Redis says the key changed (with ``tracking``)."""
        loop = asyncio.get_running_loop()
        protocol = self._protocols.get(loop)
        name = key.encode()
        if protocol is not None:
            protocol.catch_up(name)
        if protocol is None or protocol.closed:  # (the poll may have found it gone)
            protocol = await self._connect(loop)
        tracking = protocol.tracking
        if tracking is None:
            return parse(await protocol.call(pack(*args)))
        found = tracking.get(name)
        if found is not _ABSENT:
            return cast(T, found)
        token = tracking.start(name)
        value = parse(await protocol.call(pack(*args)))
        tracking.finish(name, token, value)
        return value

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        lock = self._locks.setdefault(loop, asyncio.Lock())
        async with lock:
            protocol = self._protocols.get(loop)
            if protocol is not None and not protocol.closed:
                return protocol
            try:
                protocol = await asyncio.wait_for(self._open(), self.connect_timeout)
            except OSError as exc:  # TimeoutError included
                raise StateUnavailable(f"cannot connect to Redis: {exc or 'timed out'}") from exc
            self._protocols[loop] = protocol
            return protocol

    async def _master(self, sentinel: SentinelURL) -> tuple[str, int]:
        """The master's address, from the first sentinel that knows it."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for host, port in sentinel.sentinels:
            transport: asyncio.BaseTransport | None = None
            try:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(1.0), host, port), 1.0
                )
                if sentinel.sentinel_password:
                    await protocol.call(pack("AUTH", sentinel.sentinel_password))
                found = await protocol.call(
                    pack("SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.master)
                )
            except (OSError, StateUnavailable, hiredis.ReplyError) as exc:
                errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            finally:
                if transport is not None:
                    transport.close()
            if found:
                return found[0].decode(), int(found[1])
            errors.append(f"{host}:{port}: no master named {sentinel.master!r}")
        raise OSError("no sentinel gave the master: " + "; ".join(errors))

    async def _open(self) -> _Protocol:
        address = await self._master(self.sentinel) if self.sentinel is not None else None
        protocol = await self._dial(address)
        # Not over TLS: the invalidations must be readable straight from the socket.
        if self.tracking and self.options.get("connection_class") is not SSLConnection:
            await self._track(protocol, address)
        return protocol

    async def _track(self, protocol: _Protocol, address: tuple[str, int] | None) -> None:
        """Make ``protocol`` a tracked connection: a second one, to the same server, takes
        the invalidations. Either one lost closes the other and forgets every read."""
        try:
            subscriber = await self._dial(address)
        except (OSError, StateUnavailable):
            protocol.close()
            raise
        try:
            client_id = await subscriber.call(pack("CLIENT", "ID"))
            await subscriber.call(pack("SUBSCRIBE", INVALIDATIONS))
            await protocol.call(pack("CLIENT", "TRACKING", "ON", "REDIRECT", int(client_id)))
        except hiredis.ReplyError as exc:  # Redis < 6, or an ACL without CLIENT
            subscriber.close()
            if not self._untracked_said:
                self._untracked_said = True
                log.warning("resolver: Redis refused client tracking (%s): every read asks", exc)
            return
        except StateUnavailable:
            subscriber.close()
            protocol.close()
            raise
        tracking = _Tracking()
        subscriber.on_push = tracking.invalidate
        subscriber.on_lost = protocol.close
        protocol.on_lost = subscriber.close
        protocol.subscriber = subscriber
        protocol.tracking = tracking

    async def _dial(self, address: tuple[str, int] | None) -> _Protocol:
        """One connection, authenticated, on the right database: to ``address`` (the
        master a sentinel named) or to the URL's server."""
        loop = asyncio.get_running_loop()
        opts = self.options
        cls = opts.get("connection_class")
        transport: asyncio.BaseTransport
        if address is not None:
            host, port = address
            transport, protocol = await loop.create_connection(
                lambda: _Protocol(self.timeout), host, port
            )
        elif cls is UnixDomainSocketConnection:
            transport, protocol = await loop.create_unix_connection(
                lambda: _Protocol(self.timeout), opts["path"]
            )
        else:
            ssl = None
            if cls is SSLConnection:
                import ssl as _ssl

                ssl = _ssl.create_default_context()
            transport, protocol = await loop.create_connection(
                lambda: _Protocol(self.timeout),
                opts.get("host", "localhost"),
                int(opts.get("port", 6379)),
                ssl=ssl,
            )
        hello: list[bytes] = []
        if opts.get("password"):
            if opts.get("username"):
                hello.append(pack("AUTH", opts["username"], opts["password"]))
            else:
                hello.append(pack("AUTH", opts["password"]))
        if int(opts.get("db", 0) or 0):
            hello.append(pack("SELECT", int(opts["db"])))
        for payload in hello:
            try:
                await protocol.call(payload)
            except hiredis.ReplyError as exc:
                transport.close()
                raise StateUnavailable(f"Redis refused the connection: {exc}") from exc
        return protocol

    async def close(self) -> None:
        """Close this event loop's connection."""
        protocol = self._protocols.pop(asyncio.get_running_loop(), None)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
