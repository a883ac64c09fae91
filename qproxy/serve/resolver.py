"""The resolver: tells nginx where a file is right now.

One router (:meth:`Resolver.__call__`) sends each request to one handler. The hot ones
(nginx asking about a key: ``/resolve/``, ``/auth``, the public path) are raw ASGI: one
Redis round trip, :func:`qproxy.core.decision.decide`, and a prebuilt answer. The others
(status, the signed blob, health, metrics, standalone file sending) are Starlette request
handlers. The resolver also runs this node's janitor (its ASGI lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import quote, unquote

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core import decision as render
from qproxy.core.decision import MISSING, Decision, decide, should_ask_s3
from qproxy.errors import ConfigError, InvalidKey, QProxyError, StateUnavailable
from qproxy.headers import check_signature, signed_query
from qproxy.keys import validate_key
from qproxy.stores import Objects
from qproxy.stores.s3 import RemoteStore
from qproxy.stores.state import AsyncStateReader
from qproxy.worker.sweep import sweep

log = logging.getLogger("qproxy.resolver")

# The resolver asks S3 only about misses, and must answer nginx even when S3 hangs (it
# degrades, never fails): each such question gets this long, one attempt, and after a
# failure S3 is not asked again for S3_BACKOFF seconds.
S3_TIMEOUT = 2.0
S3_BACKOFF = 5.0

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def check_config(config: Config) -> None:
    """Refuse to start on settings the resolver cannot serve with (rather than failing on
    the first redirect)."""
    if not config.s3_bucket:
        raise ConfigError(
            "QPROXY_S3_BUCKET is not set: the resolver sends clients there once files reach S3"
        )


class Resolver:
    """The ASGI app and the janitor of one node."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        stores: Stores | None = None,
        standalone: bool | None = None,
    ) -> None:
        self.stores = stores or Stores(config)
        self.config = config = self.stores.config
        check_config(config)
        self.standalone = config.standalone if standalone is None else standalone
        self.counts: Counter[str] = Counter()
        self.reader = AsyncStateReader(config.redis_url)
        self._misses: dict[str, float] = {}
        self._s3_down_until = 0.0
        self.redirect_max_age = config.redirect_max_age
        # A cached redirect stays well inside its URL's life (URLs are reused for a tenth).
        self.redirect_ttl = str(min(10, config.presign_expires // 10)).encode()
        self.public_path = config.public_path
        # The one routing table: exact paths, then prefixes in order; the public path last,
        # so a public path of "/" never hides the service routes.
        self._exact: dict[str, Handler] = {
            "/auth": self._auth,
            "/healthz": request_response(self.healthz),
            "/metrics": request_response(self.metrics),
        }
        public = self._standalone_file if self.standalone else self._public
        self._prefixes: list[tuple[str, Handler]] = [
            ("/resolve/", self._resolve),
            ("/status/", request_response(self.status)),
            ("/internal/blob/", request_response(self.blob)),
            (self.public_path, public),
        ]
        self._janitor_task: asyncio.Task[None] | None = None

    @functools.cached_property
    def remote(self) -> Objects:
        """S3 for the resolver's own questions: short timeouts, one attempt."""
        return RemoteStore(self.config, timeout=S3_TIMEOUT)

    # -- routing --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        handler = self._exact.get(path)
        if handler is None:
            for prefix, candidate in self._prefixes:
                if path.startswith(prefix):
                    handler = candidate
                    break
        if handler is None:
            await _send(send, *render.MISSING_ANSWER)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, 405, [(b"content-length", b"0"), (b"allow", b"GET, HEAD")], b"")
            return
        await handler(scope, receive, send)

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
        stores = self.stores

        def remote_url(name: str) -> str:
            return stores.remote.url(name, method=method)

        def local_exists() -> bool:
            return stores.local.exists(key)

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
        if should_ask_s3(decision, record, retry=retry):
            name = key if record is None else record.object
            decision = await anyio.to_thread.run_sync(self._from_s3, key, name, method)
        return decision

    def _s3_has(self, name: str) -> bool | None:
        """Whether S3 holds ``name``; None when S3 did not answer (then it is left alone
        for a while, so a hanging S3 costs one timeout, not one per request)."""
        if self._s3_down_until > time.monotonic():
            return None
        try:
            return self.remote.exists(name)
        except QProxyError as exc:
            log.warning("resolver: S3 unavailable: %s", exc)
            self._s3_down_until = time.monotonic() + S3_BACKOFF
            return None

    def _from_s3(self, key: str, name: str, method: str) -> Decision:
        now = time.monotonic()
        if self._misses.get(name, 0.0) > now:
            return MISSING
        found = self._s3_has(name)
        if found:
            return Decision("redirect", key=key, url=self.stores.remote.url(name, method=method))
        if found is None:
            return MISSING
        if len(self._misses) > 10_000:
            self._misses.clear()
        self._misses[name] = now + 5.0  # recent misses are remembered briefly
        return MISSING

    def _degraded(self, key: str, method: str) -> Decision:
        if self.stores.local.exists(key):
            return Decision("local", key=key)
        if self._s3_has(key):
            url = self.stores.remote.url(key, method=method)
            return Decision("redirect", key=key, url=url, max_age=0)
        return MISSING

    def _signed(self, key: str) -> str:
        return signed_query(self.config.secret, key)

    def x_accel(self, decision: Decision) -> tuple[int, render.RawHeaders, bytes]:
        signed = self._signed(decision.key) if decision.kind == "peer" else ""
        return render.x_accel(decision, redirect_ttl=self.redirect_ttl, signed_query=signed)

    # -- the hot handlers (raw ASGI) ------------------------------------------------------

    async def _resolve(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._answer(scope, send, scope["path"][len("/resolve/") :])

    async def _public(self, scope: Scope, receive: Receive, send: Send) -> None:
        # nginx asks with the public URL too (its @qp_retry does).
        await self._answer(scope, send, scope["path"][len(self.public_path) :])

    async def _answer(self, scope: Scope, send: Send, raw_key: str) -> None:
        retry = False
        for name, value in scope["headers"]:
            if name == b"x-qp-retry":
                retry = value == b"1"
        decision = await self.counted(raw_key, method=scope["method"], retry=retry)
        await _send(send, *self.x_accel(decision))

    async def _auth(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        await _send(send, 200, await self.auth_answer(asked), b"")

    async def auth_answer(self, headers: Mapping[str, str]) -> render.RawHeaders:
        """The auth_request answer for the original request nginx describes."""
        original = headers.get("x-original-uri", "")
        path = unquote(original.split("?", 1)[0])
        if not path.startswith(self.public_path):
            return render.AUTH_NOT_OURS
        retry = headers.get("x-qp-retry") == "1"
        method = headers.get("x-original-method", "GET")
        decision = await self.counted(path[len(self.public_path) :], method=method, retry=retry)
        signed = self._signed(decision.key) if decision.kind == "peer" else ""
        return render.auth_answer(decision, redirect_ttl=self.redirect_ttl, signed_query=signed)

    # -- standalone (no nginx): the resolver sends the bytes itself -----------------------

    async def _standalone_file(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        raw_key = scope["path"][len(self.public_path) :]
        decision = await self.counted(raw_key, method=request.method)
        response: Response
        if decision.kind == "local":
            path = self.stores.local.path_for(decision.key)
            if not path.is_file():
                decision = await self.lookup(decision.key, method=request.method, retry=True)
                await _send(send, *self.x_accel(decision))
                return
            headers = {"Cache-Control": "private, max-age=60"}
            if decision.disposition:
                headers["Content-Disposition"] = decision.disposition
            response = FileResponse(path, media_type=decision.content_type, headers=headers)
        elif decision.kind == "peer":
            url = (
                f"http://{decision.peer}/internal/blob/{quote(decision.key, safe='/')}"
                f"?{self._signed(decision.key)}"
            )
            response = Response(
                b"", status_code=302, headers={"Location": url, "Cache-Control": "no-store"}
            )
        else:
            await _send(send, *self.x_accel(decision))
            return
        await response(scope, receive, send)

    # -- the other handlers (Starlette requests) ------------------------------------------

    async def status(self, request: Request) -> Response:
        try:
            key = validate_key(request.scope["path"][len("/status/") :])
        except InvalidKey as exc:
            return JSONResponse({"error": exc.reason}, status_code=400)
        try:
            record = await anyio.to_thread.run_sync(self.stores.state.get, key)
        except StateUnavailable:
            return JSONResponse({"error": "state store unavailable"}, status_code=503)
        if record is None:
            return JSONResponse({"error": "not found", "key": key}, status_code=404)
        return JSONResponse(record.as_dict())

    async def blob(self, request: Request) -> Response:
        """A local file for another node's worker or nginx, behind a signed, expiring URL."""
        key = request.scope["path"][len("/internal/blob/") :]
        q = request.query_params
        try:
            validate_key(key)
        except InvalidKey:
            return PlainTextResponse("not found\n", status_code=404)
        if not check_signature(self.config.secret, key, q.get("exp", ""), q.get("sig", "")):
            return PlainTextResponse("forbidden\n", status_code=403)
        path = self.stores.local.path_for(key)
        if not path.is_file():
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(path)

    async def healthz(self, request: Request) -> Response:
        redis_ok = await anyio.to_thread.run_sync(self.stores.state.ping)
        s3_ok = await anyio.to_thread.run_sync(self.remote.ping)
        body = {"redis": redis_ok, "s3": s3_ok, "node": self.config.node_id}
        return JSONResponse(body, status_code=200 if redis_ok and s3_ok else 503)

    async def metrics(self, request: Request) -> Response:
        lines = ["# TYPE qproxy_resolve_total counter"]
        for kind in ("local", "peer", "redirect", "missing"):
            lines.append(f'qproxy_resolve_total{{decision="{kind}"}} {self.counts[kind]}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # -- lifespan: the janitor ------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._janitor_task = asyncio.create_task(self._janitor())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._janitor_task is not None:
                    self._janitor_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._janitor_task
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _janitor(self) -> None:
        """This node's upkeep, and now and then (one node at a time) the cluster's."""
        next_cluster = 0.0
        while True:
            started = time.monotonic()
            try:
                cluster = started >= next_cluster and await anyio.to_thread.run_sync(
                    self.stores.state.try_lock, "sweep", self.config.sweep_interval
                )
                if cluster:
                    next_cluster = started + self.config.sweep_interval
                report = await anyio.to_thread.run_sync(
                    functools.partial(sweep, self.stores, cluster=bool(cluster))
                )
                if any(report.as_dict().values()):
                    log.info("janitor: %s", report.as_dict())
            except Exception as exc:  # Redis down, disk trouble: try again next round
                log.warning("janitor: %s", exc)
            await asyncio.sleep(
                max(0.1, self.config.janitor_interval - (time.monotonic() - started))
            )


async def _send(send: Send, status: int, headers: render.RawHeaders, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: Config | None = None, *, standalone: bool | None = None) -> ASGIApp:
    """The resolver as an ASGI app (``uvicorn --factory qproxy.resolver:create_app``)."""
    return Resolver(config, standalone=standalone)
