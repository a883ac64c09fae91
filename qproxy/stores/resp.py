"""A small pipelined Redis client for the resolver's one hot read.

redis.asyncio checks a connection out of its pool for every command and waits for the
answer before the connection serves anyone else: measured ~80 us per HGETALL on loopback,
which capped the resolver at ~5.5k req/s. Here every concurrent request writes its command
to one shared connection at once and the answers come back in order (Redis answers a
connection's commands in the order they arrive), parsed by hiredis: ~6 us per lookup under
load. Everything else in qproxy uses redis-py. Every failure (no connection, a lost
connection, no answer in time) is a :class:`qproxy.errors.StateUnavailable`.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from qproxy.errors import StateUnavailable
from qproxy.redis_url import SentinelURL, is_sentinel, parse_sentinel


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.WriteTransport | None = None
        self.timeout = timeout
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            self._dispatch()
        except hiredis.ProtocolError as exc:  # not Redis speaking: drop the connection
            self._abort(f"Redis protocol error: {exc}")

    def _dispatch(self) -> None:
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            if not waiters:  # an answer nobody asked for: the stream is out of step
                self._abort("unexpected reply")
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

    def _fail(self, exc: Exception) -> None:
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

    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0) -> None:
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
        loop = asyncio.get_running_loop()
        opts = self.options
        cls = opts.get("connection_class")
        transport: asyncio.BaseTransport
        if self.sentinel is not None:
            host, port = await self._master(self.sentinel)
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
