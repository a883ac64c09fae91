"""ASGI middleware: ``app = UploadMiddleware(app)``.

The same engine as the WSGI middleware (:mod:`qproxy.core.upload` and
:class:`qproxy.lifecycle.ingest.Intake`); only the I/O differs. Parsing, disk writes and
commits run in a worker thread, so a large upload never blocks the event loop; the app sees
the rewritten form once the files are on disk.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qproxy import logs, metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core import tus as tus_core
from qproxy.core.upload import (
    KEY_HEADER,
    PRIVATE_HEADERS,
    Answer,
    Outcome,
    Settle,
    UploadRequest,
    Uploads,
    drain_budget,
    refusal,
)
from qproxy.errors import ClientDisconnected, QProxyError
from qproxy.lifecycle.ingest import Intake, begin
from qproxy.lifecycle.tus import Tus

log = logging.getLogger("qproxy")
T = TypeVar("T")

# Body messages are gathered up to this size before one hop to the worker thread.
FEED_SIZE = 1024 * 1024
_KEY = KEY_HEADER.lower().encode()
_PRIVATE = frozenset(name.encode() for name in PRIVATE_HEADERS)
_DROP = frozenset({b"content-length", b"transfer-encoding", *_PRIVATE})


class UploadMiddleware:
    """Streams uploads (multipart file parts, raw bodies) to the local store."""

    def __init__(
        self, app: ASGIApp, config: Config | None = None, *, stores: Stores | None = None
    ) -> None:
        self.app = app
        self.stores = stores or Stores(config)
        self.config = self.stores.config
        metrics.setup(self.config)
        if self.config.log_format == "json":  # (otherwise the app's logging is the app's)
            logs.setup(self.config, whole_process=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        headers: dict[str, str] = {}
        repeated: set[str] = set()
        for raw_name, raw_value in raw_headers:
            name = raw_name.decode("latin-1")
            if name in headers:
                repeated.add(name)
            else:  # the first, as Starlette reads it (repeated ones are refused anyway)
                headers[name] = raw_value.decode("latin-1")
        # Only qproxy may tell the app a key: never pass a client's own X-QProxy-Key on.
        if any(name in _PRIVATE for name, _ in raw_headers):
            raw_headers = [(n, v) for n, v in raw_headers if n not in _PRIVATE]
            scope = {**scope, "headers": raw_headers}
        scope.pop("qproxy.tus", None)
        tus_path = self.config.tus_path
        path = scope["path"]
        if tus_path and (path.startswith(tus_path) or path + "/" == tus_path):
            await self._tus(scope, receive, send, headers, path[len(tus_path) :])
            return
        request = UploadRequest(
            method=scope["method"],
            path=scope["path"],
            content_type=headers.get("content-type"),
            content_disposition=headers.get("content-disposition"),
            content_length=headers.get("content-length"),
            framed=True,  # an ASGI server delimits the body (more_body)
            body_file=headers.get("x-qproxy-body-file"),
            body_token=headers.get("x-qproxy-body-token"),
            repeated=frozenset(repeated),
        )
        try:
            start = functools.partial(begin, self.stores, request)
            # An offloaded body is hashed and fsynced on taking it: not on the event loop.
            intake = await anyio.to_thread.run_sync(start) if request.body_file else start()
        except QProxyError as exc:
            await _drain(receive, self._budget(request, 0))
            await _send(refusal(exc), send)
            return
        if intake is None:
            await self.app(scope, receive, send)
            return

        counter = _Counter()
        try:
            if not intake.offloaded:
                await self._read_body(receive, intake, counter)
        except ClientDisconnected:
            await anyio.to_thread.run_sync(intake.discard)
            return
        except QProxyError as exc:
            await anyio.to_thread.run_sync(intake.discard)
            log.info("qproxy: upload refused (%s): %s", exc.status, exc.reason)
            if not counter.ended:
                await _drain(receive, self._budget(request, counter.received))
            await _send(refusal(exc), send)
            return
        except BaseException:
            await anyio.to_thread.run_sync(intake.discard)
            raise

        body = intake.body()
        new_headers = [(n, v) for n, v in raw_headers if n not in _DROP]
        new_headers.append((b"content-length", str(len(body)).encode()))
        if intake.raw_key is not None:
            new_headers.append((_KEY, intake.raw_key.encode()))
        response = _Response(intake, body, receive, send)
        uploads = Uploads(intake.files, response.settle)
        app_scope = {**scope, "headers": new_headers, "qproxy.uploads": uploads}
        await response.run(self.app, app_scope)

    # -- tus: resumable uploads (the WSGI middleware's flow, its I/O in threads) -------------

    @functools.cached_property
    def tus(self) -> Tus:
        return Tus(self.stores)

    async def _tus(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], rest: str
    ) -> None:
        tus = self.tus
        cors = tus_core.cors_headers(headers.get("origin"), self.config.tus_origins)
        if cors:  # every answer, the app's own refusals too, readable by the browser
            send = _adding(send, [(n.lower().encode(), v.encode()) for n, v in cors])
        length = headers.get("content-length", "")
        body = _TusBody(receive, int(length) if length.isdigit() else None)
        try:
            call = tus_core.parse(scope["method"], rest, headers, max_size=tus.max_size)
            if call.kind == "options":
                await _send(tus_core.options_answer(max_size=tus.max_size), send)
                return
            if call.kind == "head":
                upload = await anyio.to_thread.run_sync(tus.get, call.upload_id)
                await _send(tus_core.head_answer(tus.parts_shown(upload)), send)
                return
            if call.kind == "delete":
                await anyio.to_thread.run_sync(tus.terminate, call.upload_id)
                await _send(tus_core.terminated_answer(), send)
                return
            if call.kind == "create":
                info = {"length": call.length, "metadata": tus_core.parse_metadata(call.metadata)}
                status, app_headers, answer = await _ask(
                    self.app, {**scope, "qproxy.tus": info}, None
                )
                if status >= 400:
                    await body.drain(tus.max_size)
                    await _send_raw(status, app_headers, answer, send)
                    return
                make = tus.create_final if call.concat == "final" else tus.create
                upload = await anyio.to_thread.run_sync(make, call)
                if call.body_length:
                    upload = await body.write_with(functools.partial(tus.append, upload, call))
                done = upload.complete and not upload.is_partial
                if done and await self._tus_complete(scope, send, upload):
                    return
                location = tus.location(upload.upload_id)
                created = tus_core.created_answer(
                    location, upload, with_body=bool(call.body_length)
                )
                await _send(created, send)
                return
            upload = await anyio.to_thread.run_sync(tus.get, call.upload_id)
            upload = await body.write_with(functools.partial(tus.append, upload, call))
            done = upload.complete and not upload.is_partial
            if done and await self._tus_complete(scope, send, upload):
                return
            await _send(tus_core.patched_answer(upload), send)
        except tus_core.TusRefusal as refused:
            await body.drain(tus.max_size)
            await _send(refused.answer(), send)

    async def _tus_complete(self, scope: Scope, send: Send, upload: tus_core.Upload) -> bool:
        """The last byte is in: the app gets the file as a raw-body upload and its answer
        decides the commit. True when it refused (its answer was sent)."""
        intake = await anyio.to_thread.run_sync(self.tus.finish, upload)
        settle = Settle()
        assert intake.raw_key is not None
        headers = [(n, v) for n, v in scope.get("headers", []) if n not in _DROP]
        headers += [(b"content-length", b"0"), (_KEY, intake.raw_key.encode())]
        info = {"length": upload.length, "metadata": tus_core.parse_metadata(upload.metadata)}
        # Always as PATCH of the upload's own URL (also when a POST brought the last byte:
        # creation-with-upload, concatenation), so the app has one route for it.
        location = self.tus.location(upload.upload_id)
        app_scope = {
            **scope,
            "method": "PATCH",
            "path": location,
            "raw_path": location.encode(),
            "query_string": b"",
            "headers": headers,
            "qproxy.uploads": Uploads(intake.files, settle),
            "qproxy.tus": info,
        }
        try:
            status, app_headers, answer = await _ask(self.app, app_scope, settle)
        except BaseException:
            await anyio.to_thread.run_sync(intake.settle, settle.failed())
            raise
        await anyio.to_thread.run_sync(intake.settle, settle.finished())
        if settle.outcome == "commit":
            return False
        if status < 400:
            await _send(self.tus.not_taken(upload, status), send)
        else:
            await _send_raw(status, app_headers, answer, send)
        return True

    def _budget(self, request: UploadRequest, received: int) -> int:
        try:
            declared: int | None = int(request.content_length or "")
        except ValueError:
            declared = None
        return drain_budget(
            declared=declared, received=received, max_body=self.config.max_upload_bytes
        )

    async def _read_body(self, receive: Receive, intake: Intake, counter: _Counter) -> None:
        """Feeds the body to the intake in a worker thread, one chunk in flight while the
        event loop gathers the next (so receiving and hashing/writing use two cores)."""
        sender, chunks = anyio.create_memory_object_stream[list[bytes]](1)
        cause: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_feed, chunks, intake)
                async with sender:
                    await _gather(receive, sender, counter)
        except BaseExceptionGroup as group:
            cause = _first_cause(group)
        if cause is not None:
            if isinstance(cause, QProxyError):
                # A refusal needs no traceback, and its traceback holds the tasks' frames
                # (each with a batch of body chunks) in a cycle with the task group: kept
                # until the cyclic GC ran, they grew the ASGI servers by ~25-30 MB per 80
                # refused uploads (tests/test_hostile.py, the memory check).
                cause = cause.with_traceback(None)
            raise cause


class _Counter:
    """What the body read took from the server, and whether it saw the end."""

    def __init__(self) -> None:
        self.received = 0
        self.ended = False


async def _gather(
    receive: Receive, sender: MemoryObjectSendStream[list[bytes]], counter: _Counter
) -> None:
    """Body messages, handed on in batches of at least FEED_SIZE bytes (not joined: each
    byte is copied once less)."""
    batch: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if batch:  # what did arrive is the writer's (a tus PATCH keeps it)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await sender.send(batch)
            raise ClientDisconnected
        body = message.get("body", b"")
        if body:
            batch.append(body)
            size += len(body)
            counter.received += len(body)
        more = bool(message.get("more_body", False))
        counter.ended = not more
        if size >= FEED_SIZE or (batch and not more):
            await sender.send(batch)
            batch, size = [], 0
        if not more:
            return


async def _drain(receive: Receive, budget: int) -> None:
    """Receive and throw away up to ``budget`` bytes of a refused body (drain_budget)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _feed(chunks: MemoryObjectReceiveStream[list[bytes]], intake: Intake) -> None:
    async with chunks:
        async for batch in chunks:
            await anyio.to_thread.run_sync(_feed_batch, intake, batch)
    await anyio.to_thread.run_sync(intake.feed, b"")


def _feed_batch(intake: Intake, batch: list[bytes]) -> None:
    for body in batch:
        intake.feed(body)


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that stopped the body read, not the ones it caused in its partner
    task (a closed stream, a cancellation)."""
    knock_on = (
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.get_cancelled_exc_class(),
    )
    found = [exc for exc in _leaves(group) if not isinstance(exc, knock_on)]
    return found[0] if found else group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


class _Response:
    """Runs the app on the rewritten body; the core's :class:`Settle` hears of its answer
    (committed or discarded at ``http.response.start``)."""

    def __init__(self, intake: Intake, body: bytes, receive: Receive, send: Send) -> None:
        self.intake = intake
        self.settle = Settle()
        self.body: bytes | None = body
        self._receive = receive
        self._send = send

    async def receive(self) -> Message:
        if self.body is not None:
            self.settle.looked_at()
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()  # after the body: wait for the disconnect

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.settle.started(int(message["status"]))
            await self._carry_out(self.settle.sending())
        await self._send(message)

    async def _carry_out(self, outcome: Outcome | None) -> None:
        if outcome is not None:
            await anyio.to_thread.run_sync(self.intake.settle, outcome)

    async def run(self, app: ASGIApp, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self.receive, self.send)
        except BaseException:
            await self._carry_out(self.settle.failed())
            raise
        await self._carry_out(self.settle.finished())


class _TusBody:
    """A tus request's body: written by a worker thread while the event loop gathers the
    next batch of it, or thrown away before a refusal."""

    def __init__(self, receive: Receive, length: int | None) -> None:
        self.receive = receive
        self.length = length
        self.received = 0
        self.ended = False

    async def write_with(self, write: Callable[[Iterator[bytes]], T]) -> T:
        """``write(chunks)`` in a worker thread, handed FEED_SIZE batches (one in flight
        while the loop receives the next: one hop between them a batch, not a message).
        A client gone ends the chunks: what arrived is still written."""
        sender, batches = anyio.create_memory_object_stream[list[bytes]](1)
        counter = _Counter()
        done: list[T] = []

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    batch = anyio.from_thread.run(batches.receive)
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                yield from batch

        async def run() -> None:
            async with batches:  # closed when the writer stops: the gathering stops too
                done.append(await anyio.to_thread.run_sync(write, chunks()))

        cause: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                async with sender:
                    with contextlib.suppress(
                        ClientDisconnected, anyio.BrokenResourceError, anyio.ClosedResourceError
                    ):
                        await _gather(self.receive, sender, counter)
        except BaseExceptionGroup as group:
            cause = _first_cause(group)
        finally:
            self.received += counter.received
            self.ended = self.ended or counter.ended
        if cause is not None:
            # (no traceback: it holds the tasks' frames, and their batches, in a cycle)
            raise cause.with_traceback(None)
        return done[0]

    async def drain(self, max_size: int) -> None:
        if not self.ended:
            left = max_size if self.length is None else self.length - self.received
            await _drain(self.receive, min(max_size, left))
            self.ended = True


async def _ask(
    app: ASGIApp, scope: Scope, settle: Settle | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run the app on an empty body and keep its answer (tus sends its own on success)."""
    answer: dict[str, Any] = {"status": 500, "headers": []}
    parts: list[bytes] = []
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            if settle is not None:
                settle.looked_at()
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # (never)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = int(message["status"])
            answer["headers"] = list(message.get("headers", []))
            if settle is not None:
                settle.started(answer["status"])
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, send)
    return answer["status"], answer["headers"], b"".join(parts)


def _adding(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


async def _send_raw(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, send: Send
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send(answer: Answer, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [(n.lower().encode(), v.encode()) for n, v in answer.headers],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})
