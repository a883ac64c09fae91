"""The resolver: tells nginx where a file is right now.

:func:`decide` turns a record into a plain :class:`Decision`; the Starlette app around it
only fetches the record (one Redis round trip) and renders the decision for nginx
(X-Accel-Redirect or auth_request headers) or, in standalone mode, sends the bytes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qproxy.config import Config
from qproxy.errors import InvalidKey, QProxyError, StateUnavailable
from qproxy.headers import check_signature, content_disposition, signed_query
from qproxy.keys import validate_key
from qproxy.node import Node
from qproxy.state import LOCAL_STATES, AsyncStateReader, FileRecord
from qproxy.sweep import sweep

log = logging.getLogger("qproxy.resolver")

# The resolver's own routes, never taken for keys under the public path.
_SERVICE_PATHS = ("/auth", "/status/", "/internal/blob/", "/healthz", "/metrics")
LOCAL_PREFIX = "/_qp/local/"
PEER_PREFIX = "/_qp/peer/"

# How long nginx's micro-cache (``qproxy nginx-config --micro-cache``) may reuse an answer,
# sent as X-Accel-Expires (nginx hides it from clients). A local answer goes stale when the
# copy is dropped, which nginx's retry covers; misses are never cached (a file may arrive
# any moment).
LOCAL_DECISION_TTL = b"1"
NO_CACHE = b"0"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the bytes of one request come from."""

    kind: Literal["local", "peer", "redirect", "missing"]
    key: str = ""
    peer: str = ""  # host:port of the node holding the file
    url: str = ""  # redirect target
    content_type: str = "application/octet-stream"
    disposition: str = ""
    max_age: int = 0


MISSING = Decision("missing")


def decide(
    record: FileRecord | None,
    key: str,
    *,
    node_id: str,
    remote_url: Callable[[str], str],
    local_exists: Callable[[], bool],
    redirect_max_age: int,
    retry: bool = False,
) -> Decision:
    """The routing rule. ``retry`` is set when nginx found the local file gone."""
    if record is None:
        # Never 404 while a copy exists: an accepted file whose record Redis lost.
        if not retry and local_exists():
            return Decision("local", key=key)
        return MISSING
    if record.state in ("deleted", "pending"):
        return MISSING
    if record.state == "remote":
        return Decision(
            "redirect", key=key, url=remote_url(record.object), max_age=redirect_max_age
        )
    if retry or record.state not in LOCAL_STATES:
        # nginx found no local file although the record says local: nothing to send yet.
        return MISSING
    ctype, disposition = record.content_type, content_disposition(record.filename)
    if record.node == node_id or not record.node_url:
        return Decision("local", key=key, content_type=ctype, disposition=disposition)
    peer = urlsplit(record.node_url).netloc
    return Decision("peer", key=key, peer=peer, content_type=ctype, disposition=disposition)


class Resolver:
    """The Starlette app and the janitor of one node."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        node: Node | None = None,
        standalone: bool | None = None,
    ) -> None:
        self.node = node or Node(config)
        self.config = self.node.config
        self.standalone = self.config.standalone if standalone is None else standalone
        self.counts: Counter[str] = Counter()
        self.reader = AsyncStateReader(self.config.redis_url)
        self._misses: dict[str, float] = {}
        self.redirect_max_age = self.config.redirect_max_age
        # A cached redirect stays well inside its URL's life (URLs are reused for a tenth).
        self.redirect_ttl = str(min(10, self.config.presign_expires // 10)).encode()
        public = self.config.public_path
        routes = [
            Route("/resolve/{key:path}", self.resolve, methods=["GET", "HEAD"]),
            Route("/auth", self.auth, methods=["GET", "HEAD"]),
            Route("/status/{key:path}", self.status, methods=["GET"]),
            Route("/internal/blob/{key:path}", self.blob, methods=["GET", "HEAD"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            # Last: a public path of "/" must not hide the routes above.
            Route(public + "{key:path}", self.public, methods=["GET", "HEAD"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)
        # Under the public path nginx asks with the public URL (its retry does): answered
        # here too, unless standalone (then the resolver sends the bytes itself).
        self._public_fast = not self.standalone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The hot path (nginx asking about a key) without Starlette's routing and middleware:
        measured about a third of the resolver's time per request. Everything else is
        Starlette's."""
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path: str = scope["path"]
            if path == "/auth":
                asked = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                await _send(send, 200, await self.auth_answer(asked), b"")
                return
            if path.startswith("/resolve/"):
                raw_key = path[len("/resolve/") :]
            elif (
                self._public_fast
                and path.startswith(self.config.public_path)
                and not path.startswith(_SERVICE_PATHS)
            ):
                raw_key = path[len(self.config.public_path) :]
            else:
                raw_key = None
            if raw_key is not None:
                retry = False
                for name, value in scope["headers"]:
                    if name == b"x-qp-retry":
                        retry = value == b"1"
                decision = await self.counted(raw_key, method=scope["method"], retry=retry)
                await _send(send, *self.render(decision))
                return
        await self.app(scope, receive, send)

    # -- the decision ---------------------------------------------------------------------

    async def counted(self, raw_key: str, *, method: str, retry: bool = False) -> Decision:
        """:meth:`lookup` for a request, counted in /metrics."""
        decision = await self.lookup(raw_key, method=method, retry=retry)
        self.counts[decision.kind] += 1
        return decision

    async def lookup(self, raw_key: str, *, method: str = "GET", retry: bool = False) -> Decision:
        try:
            key = validate_key(raw_key)
        except InvalidKey:
            return MISSING
        node = self.node

        def remote_url(name: str) -> str:
            return node.remote.url(name, method=method)

        def local_exists() -> bool:
            return node.local.exists(key)

        try:
            record = await self.reader.get(key)
        except StateUnavailable as exc:
            log.warning("resolver: Redis unavailable (%s); falling back to disk, then S3", exc)
            return await anyio.to_thread.run_sync(self._degraded, key, method)
        decision = decide(
            record,
            key,
            node_id=self.config.node_id,
            remote_url=remote_url,
            local_exists=local_exists,
            redirect_max_age=self.redirect_max_age,
            retry=retry,
        )
        if decision.kind == "missing" and (
            record is None or (retry and record.state not in ("deleted", "pending"))
        ):
            # Redis lost the record (a new instance, FLUSHALL), or nginx found the local
            # copy gone: S3 may still hold the file, and a file is never a 404 while a copy
            # exists. Recent misses are remembered briefly.
            name = key if record is None else record.object
            decision = await anyio.to_thread.run_sync(self._from_s3, key, name, method)
        return decision

    def _from_s3(self, key: str, name: str, method: str) -> Decision:
        now = time.monotonic()
        if self._misses.get(name, 0.0) > now:
            return MISSING
        try:
            if self.node.remote.exists(name):
                return Decision("redirect", key=key, url=self.node.remote.url(name, method=method))
        except QProxyError as exc:
            log.warning("resolver: S3 unavailable: %s", exc)
            return MISSING
        if len(self._misses) > 10_000:
            self._misses.clear()
        self._misses[name] = now + 5.0
        return MISSING

    def _degraded(self, key: str, method: str) -> Decision:
        if self.node.local.exists(key):
            return Decision("local", key=key)
        try:
            if self.node.remote.exists(key):
                return Decision(
                    "redirect", key=key, url=self.node.remote.url(key, method=method), max_age=0
                )
        except QProxyError as exc:
            log.warning("resolver: S3 unavailable too: %s", exc)
        return MISSING

    # -- HTTP -----------------------------------------------------------------------------

    async def resolve(self, request: Request) -> Response:
        retry = request.headers.get("x-qp-retry") == "1"
        decision = await self.counted(
            request.path_params["key"], method=request.method, retry=retry
        )
        return self.x_accel(decision)

    async def public(self, request: Request) -> Response:
        if not self.standalone:
            return await self.resolve(request)
        decision = await self.counted(request.path_params["key"], method=request.method)
        if decision.kind == "local":
            path = self.node.local.path_for(decision.key)
            if not path.is_file():
                decision = await self.lookup(decision.key, method=request.method, retry=True)
                return self.x_accel(decision)
            headers = {"Cache-Control": "private, max-age=60"}
            if decision.disposition:
                headers["Content-Disposition"] = decision.disposition
            return FileResponse(path, media_type=decision.content_type, headers=headers)
        if decision.kind == "peer":
            return self._peer_redirect(decision)
        return self.x_accel(decision)

    def x_accel(self, decision: Decision) -> Response:
        status, headers, body = self.render(decision)
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response

    def render(self, decision: Decision) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The X-Accel answer for nginx as raw ASGI parts: status, headers, body."""
        kind = decision.kind
        if kind == "local" or kind == "peer":
            if kind == "local":
                target = LOCAL_PREFIX + quote(decision.key, safe="/")
            else:
                target = (
                    f"{PEER_PREFIX}{decision.peer}/{quote(decision.key, safe='/')}"
                    f"?{self._signed(decision.key)}"
                )
            headers = [
                (b"content-length", b"0"),
                (b"content-type", decision.content_type.encode("latin-1", "replace")),
                (b"x-accel-expires", LOCAL_DECISION_TTL),
                (b"x-accel-redirect", target.encode("latin-1")),
            ]
            if decision.disposition:
                headers.append((b"content-disposition", decision.disposition.encode("latin-1")))
            return 200, headers, b""
        if kind == "redirect":
            cache = f"private, max-age={decision.max_age}" if decision.max_age else "no-store"
            return (
                302,
                [
                    (b"content-length", b"0"),
                    (b"x-accel-expires", self.redirect_ttl),
                    (b"location", decision.url.encode("latin-1")),
                    (b"cache-control", cache.encode()),
                ],
                b"",
            )
        return (
            404,
            [
                (b"content-length", b"10"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"x-accel-expires", NO_CACHE),
                (b"cache-control", b"no-store"),
            ],
            b"not found\n",
        )

    def _peer_redirect(self, decision: Decision) -> Response:
        url = f"http://{decision.peer}/internal/blob/{quote(decision.key, safe='/')}?{self._signed(decision.key)}"
        return Response(
            b"", status_code=302, headers={"Location": url, "Cache-Control": "no-store"}
        )

    def _signed(self, key: str) -> str:
        return signed_query(self.config.secret, key)

    async def auth(self, request: Request) -> Response:
        response = Response(b"", status_code=200)
        response.raw_headers = await self.auth_answer(request.headers)
        return response

    async def auth_answer(self, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        """auth_request allows only 2xx/401/403 (anything else becomes a 500 in nginx), so
        every outcome is a 200 and the X-QP-* headers say what to do; no headers: 404."""
        original = headers.get("x-original-uri", "")
        method = headers.get("x-original-method", "GET")
        path = unquote(original.split("?", 1)[0])
        public = self.config.public_path
        out = [(b"content-length", b"0")]
        if not path.startswith(public):
            return [*out, (b"x-accel-expires", NO_CACHE)]
        retry = headers.get("x-qp-retry") == "1"
        decision = await self.counted(path[len(public) :], method=method, retry=retry)
        out.append(
            (
                b"x-accel-expires",
                self.redirect_ttl
                if decision.kind == "redirect"
                else NO_CACHE
                if decision.kind == "missing"
                else LOCAL_DECISION_TTL,
            )
        )
        if decision.kind == "local":
            out.append((b"x-qp-path", ("/" + decision.key).encode()))
        elif decision.kind == "peer":
            peer = f"{PEER_PREFIX}{decision.peer}/{quote(decision.key, safe='/')}"
            out.append((b"x-qp-peer", f"{peer}?{self._signed(decision.key)}".encode("latin-1")))
        elif decision.kind == "redirect":
            out.append((b"x-qp-location", decision.url.encode("latin-1")))
        if decision.kind in ("local", "peer"):
            out.append((b"x-qp-content-type", decision.content_type.encode("latin-1", "replace")))
            if decision.disposition:
                out.append((b"x-qp-disposition", decision.disposition.encode("latin-1")))
        return out

    async def status(self, request: Request) -> Response:
        try:
            key = validate_key(request.path_params["key"])
        except InvalidKey as exc:
            return JSONResponse({"error": exc.reason}, status_code=400)
        try:
            record = await anyio.to_thread.run_sync(self.node.state.get, key)
        except StateUnavailable:
            return JSONResponse({"error": "state store unavailable"}, status_code=503)
        if record is None:
            return JSONResponse({"error": "not found", "key": key}, status_code=404)
        return JSONResponse(record.as_dict())

    async def blob(self, request: Request) -> Response:
        """A local file for another node's worker or nginx, behind a signed, expiring URL."""
        key = request.path_params["key"]
        q = request.query_params
        try:
            validate_key(key)
        except InvalidKey:
            return PlainTextResponse("not found\n", status_code=404)
        if not check_signature(self.config.secret, key, q.get("exp", ""), q.get("sig", "")):
            return PlainTextResponse("forbidden\n", status_code=403)
        path = self.node.local.path_for(key)
        if not path.is_file():
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(path)

    async def healthz(self, request: Request) -> Response:
        redis_ok = await anyio.to_thread.run_sync(self.node.state.ping)
        try:
            s3_ok = await anyio.to_thread.run_sync(self.node.remote.ping)
        except QProxyError:
            s3_ok = False
        body = {"redis": redis_ok, "s3": s3_ok, "node": self.config.node_id}
        return JSONResponse(body, status_code=200 if redis_ok and s3_ok else 503)

    async def metrics(self, request: Request) -> Response:
        lines = ["# TYPE qproxy_resolve_total counter"]
        for kind in ("local", "peer", "redirect", "missing"):
            lines.append(f'qproxy_resolve_total{{decision="{kind}"}} {self.counts[kind]}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # -- janitor --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self._janitor())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _janitor(self) -> None:
        """This node's upkeep, and now and then (one node at a time) the cluster's."""
        next_cluster = 0.0
        while True:
            started = time.monotonic()
            try:
                cluster = started >= next_cluster and await anyio.to_thread.run_sync(
                    self.node.state.try_lock, "sweep", self.config.sweep_interval
                )
                if cluster:
                    next_cluster = started + self.config.sweep_interval
                report = await anyio.to_thread.run_sync(
                    functools.partial(sweep, self.node, cluster=bool(cluster))
                )
                if any(report.as_dict().values()):
                    log.info("janitor: %s", report.as_dict())
            except Exception as exc:  # Redis down, disk trouble: try again next round
                log.warning("janitor: %s", exc)
            await asyncio.sleep(
                max(0.1, self.config.janitor_interval - (time.monotonic() - started))
            )


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: Config | None = None, *, standalone: bool | None = None) -> ASGIApp:
    """The resolver as an ASGI app (``uvicorn --factory qproxy.resolver:create_app``)."""
    return Resolver(config, standalone=standalone)
