"""ASGI middleware: ``app = UploadMiddleware(app)``.

The same engine as the WSGI middleware (:class:`qproxy.node.Intake`); only the I/O
differs. Parsing, disk writes and commits run in a worker thread, so a large upload never
blocks the event loop; the app sees the rewritten form once the files are on disk.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qproxy.config import Config
from qproxy.errors import QProxyError
from qproxy.headers import OFFLOAD_FILE_HEADER, OFFLOAD_TOKEN_HEADER
from qproxy.intercept import KEY_HEADER, check_length, error_response, should_commit
from qproxy.node import Intake, Node

log = logging.getLogger("qproxy")

# Body messages are gathered up to this size before one hop to the worker thread.
FEED_SIZE = 1024 * 1024
_KEY = KEY_HEADER.lower().encode()
_FILE = OFFLOAD_FILE_HEADER.lower().encode()
_TOKEN = OFFLOAD_TOKEN_HEADER.lower().encode()
# Headers only qproxy may set for the app (or only nginx for qproxy): never passed on.
_PRIVATE = frozenset({_KEY, _FILE, _TOKEN})
_DROP = frozenset({b"content-length", b"transfer-encoding", *_PRIVATE})


class ClientDisconnected(Exception):
    """The client went away before the whole body arrived."""


class UploadMiddleware:
    """Streams uploads (multipart file parts, raw bodies) to the local store."""

    def __init__(
        self, app: ASGIApp, config: Config | None = None, *, node: Node | None = None
    ) -> None:
        self.app = app
        self.node = node or Node(config)
        self.config = self.node.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in raw_headers}
        # Only qproxy may tell the app a key: never pass a client's own X-QProxy-Key on.
        if any(name in _PRIVATE for name, _ in raw_headers):
            raw_headers = [(n, v) for n, v in raw_headers if n not in _PRIVATE]
            scope = {**scope, "headers": raw_headers}
        body_file = headers.get("x-qproxy-body-file")
        try:
            make_intake = functools.partial(
                self.node.intake,
                method=scope["method"],
                path=scope["path"],
                content_type=headers.get("content-type"),
                content_disposition=headers.get("content-disposition"),
                body_file=body_file,
                body_token=headers.get("x-qproxy-body-token"),
            )
            # An offloaded body is hashed and fsynced on taking it: not on the event loop.
            intake = await anyio.to_thread.run_sync(make_intake) if body_file else make_intake()
            if intake is not None and not intake.offloaded:
                check_length(
                    headers.get("content-length"),
                    chunked=True,
                    max_body=self.config.max_upload_bytes,
                )
        except QProxyError as exc:
            await _refuse(exc, send)
            return
        if intake is None:
            await self.app(scope, receive, send)
            return

        try:
            if not intake.offloaded:
                await self._read_body(receive, intake)
        except QProxyError as exc:
            await anyio.to_thread.run_sync(intake.discard)
            log.info("qproxy: upload refused (%s): %s", exc.status, exc.reason)
            await _refuse(exc, send)
            return
        except ClientDisconnected:
            await anyio.to_thread.run_sync(intake.discard)
            return
        except BaseException:
            await anyio.to_thread.run_sync(intake.discard)
            raise

        body = intake.body()
        new_headers = [(n, v) for n, v in raw_headers if n not in _DROP]
        new_headers.append((b"content-length", str(len(body)).encode()))
        if intake.raw_key is not None:
            new_headers.append((_KEY, intake.raw_key.encode()))
        app_scope = {**scope, "headers": new_headers, "qproxy.uploads": intake.files}
        await _Settle(intake, body, receive, send).run(self.app, app_scope)

    async def _read_body(self, receive: Receive, intake: Intake) -> None:
        """Feeds the body to the intake in a worker thread, one chunk in flight while the
        event loop gathers the next (so receiving and hashing/writing use two cores)."""
        sender, chunks = anyio.create_memory_object_stream[list[bytes]](1)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_feed, chunks, intake)
                async with sender:
                    await _gather(receive, sender)
        except BaseExceptionGroup as group:
            raise _first_cause(group) from None


async def _gather(receive: Receive, sender: MemoryObjectSendStream[list[bytes]]) -> None:
    """Body messages, handed on in batches of at least FEED_SIZE bytes (not joined: each
    byte is copied once less)."""
    batch: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        if body:
            batch.append(body)
            size += len(body)
        more = bool(message.get("more_body", False))
        if size >= FEED_SIZE or (batch and not more):
            await sender.send(batch)
            batch, size = [], 0
        if not more:
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


class _Settle:
    """Runs the app on the rewritten body; commits or discards at ``http.response.start``."""

    def __init__(self, intake: Intake, body: bytes, receive: Receive, send: Send) -> None:
        self.intake = intake
        self.body: bytes | None = body
        self._receive = receive
        self._send = send
        self.settled = False

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()  # after the body: wait for the disconnect

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self.settled:
            # Settled before the status leaves: a client that sees a 2xx can rely on its
            # files being committed.
            self.settled = True
            if should_commit(int(message["status"])):
                await anyio.to_thread.run_sync(self.intake.commit)
            else:
                await anyio.to_thread.run_sync(self.intake.discard)
        await self._send(message)

    async def run(self, app: ASGIApp, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self.receive, self.send)
        finally:
            if not self.settled:
                self.settled = True
                await anyio.to_thread.run_sync(self.intake.discard)


async def _refuse(exc: QProxyError, send: Send) -> None:
    status, headers, body = error_response(exc)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(n.lower().encode(), v.encode()) for n, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
