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
import dataclasses
import functools
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Generic, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from qproxy import logs, metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core import decision as render
from qproxy.core import tus
from qproxy.core.decision import (
    BLOB_PREFIX,
    FORBIDDEN,
    MAX_RANGES,
    MEDIA_CSP,
    MISSING,
    NOSNIFF,
    UNKNOWN,
    Decision,
    Shown,
    decide,
    is_private,
    should_ask_s3,
    shown_as,
)
from qproxy.core.record import FileRecord, State
from qproxy.errors import ConfigError, InvalidKey, QProxyError, StateUnavailable
from qproxy.headers import TOKEN_HEADER as ADMIN_TOKEN_HEADER
from qproxy.headers import check_file_query, check_signature, signed_query
from qproxy.keys import validate_key
from qproxy.lifecycle import nodes
from qproxy.serve.admin import StatusPage
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
# A peer's name is resolved at most this often (a node that moves is followed this soon).
PEER_DNS_TTL = 30.0
# With the record cache, an answer is kept this long for the record it was made from (a
# new record is another answer at once): a hot key costs a dictionary lookup, not a new
# decision, signature and rendering. Far inside every signed or presigned URL's life.
ANSWER_MEMO_SECONDS = 1.0
ANSWER_MEMO_SIZE = 10_000

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
Answer = TypeVar("Answer")


@dataclasses.dataclass(frozen=True, slots=True)
class _Memo(Generic[Answer]):
    record: FileRecord
    kind: str
    answer: Answer
    until: float


TOKEN_HEADER = ADMIN_TOKEN_HEADER.lower().encode()
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_FORBIDDEN = (
    403,
    [(b"content-length", b"10"), (b"content-type", b"text/plain; charset=utf-8")],
    b"forbidden\n",
)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loopback(host: str) -> bool:
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Blob(FileResponse):
    max_ranges = MAX_RANGES


def _not_modified(request: Request, etag: str, mtime: float) -> bool:
    """A GET or HEAD the client's copy answers (If-None-Match, else If-Modified-Since)."""
    match = request.headers.get("if-none-match")
    if match is not None:
        tags = {t.strip().removeprefix("W/") for t in match.split(",")}
        return "*" in tags or etag in tags
    since = request.headers.get("if-modified-since")
    if since:
        try:
            return int(mtime) <= parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, IndexError):
            return False
    return False


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
        metrics.setup(config)
        logs.setup(config)  # (the janitor's and the sweep's lines: time and level on each)
        self.reader = AsyncStateReader(config.redis_url, tracking=config.record_cache)
        self._misses: dict[str, float] = {}
        self._peer_addresses: dict[str, tuple[str, float]] = {}
        # (mode, method, raw key) -> the answer last made; only with the record cache, whose
        # records are the same object until Redis says they changed.
        self._memo: dict[tuple[str, str, str], _Memo[Any]] | None = (
            {} if config.record_cache else None
        )
        self._s3_down_until = 0.0
        self._redis_warning = logs.Throttled(log)  # (a line every 10 s while Redis is away)
        self.redirect_max_age = config.redirect_max_age
        self.inline_types = config.inline
        self.private_globs = config.private_globs
        # A cached redirect stays well inside its URL's life (URLs are reused for a tenth).
        self.redirect_ttl = str(min(10, config.presign_expires // 10)).encode()
        self.public_path = config.public_path
        # The one routing table: exact paths, then prefixes in order; the public path last,
        # so a public path of "/" never hides the service routes.
        self._exact: dict[str, Handler] = {
            "/auth": self._auth,
            "/tus-route": self._tus_route,
            "/healthz": request_response(self.healthz),
            "/readyz": request_response(self.readyz),
            "/metrics": request_response(self.metrics),
        }
        public = self._standalone_file if self.standalone else self._public
        # The status page asks for the admin token itself (and takes POSTs: a retry).
        self._admin: Handler = StatusPage(self.stores)
        self._blob_file: Handler = request_response(self.blob)
        self._blob_handler: Handler = self._blob
        self._prefixes: list[tuple[str, Handler]] = [
            ("/admin/", self._admin),
            ("/resolve/", self._resolve),
            ("/status/", request_response(self.status)),
            ("/internal/blob/", self._blob_handler),
            (self.public_path, public),
        ]
        # Served to any host: signed blobs, and in standalone mode the files themselves.
        self._open_handlers: set[Handler] = {self._blob_handler, self._admin}
        # And the health checks, for load balancers on other hosts.
        self._open_handlers |= {self._exact["/healthz"], self._exact["/readyz"]}
        if self.standalone:
            self._open_handlers.add(public)
        self._janitor_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

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
        if handler is None and path == "/admin":
            await _send(send, 308, [(b"location", b"/admin/"), (b"content-length", b"0")], b"")
            return
        if handler is None:
            await _send(send, *render.MISSING_ANSWER)
            return
        if scope["method"] not in ("GET", "HEAD") and handler is not self._admin:
            await _send(send, 405, [(b"content-length", b"0"), (b"allow", b"GET, HEAD")], b"")
            return
        if handler not in self._open_handlers and not self._trusted(scope):
            # Other hosts reach this port for /internal/blob (signed); the rest (records,
            # metrics, presigned URLs for any key) is for nginx and operators.
            await _send(send, *_FORBIDDEN)
            return
        await handler(scope, receive, send)

    def _trusted(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client or _loopback(client[0]):  # no client: a unix socket
            return True
        token = self.config.admin_token
        if not token:
            return False
        for name, value in scope["headers"]:
            if name == TOKEN_HEADER:
                return hmac.compare_digest(value, token.encode())
        return False

    # -- the decision ---------------------------------------------------------------------

    async def counted(
        self, raw_key: str, *, method: str, retry: bool = False, query: str = ""
    ) -> Decision:
        """:meth:`lookup` for a request, counted in /metrics."""
        started = time.monotonic()
        decision, _ = await self._lookup(raw_key, method=method, retry=retry, query=query)
        metrics.decided(decision.kind, time.monotonic() - started)
        return decision

    async def _memoized(
        self,
        mode: str,
        raw_key: str,
        method: str,
        make: Callable[[Decision], Answer],
        *,
        retry: bool,
        query: str,
    ) -> Answer:
        """The answer ``make`` renders for the request's decision, counted in /metrics; kept
        for the record it came from (see ANSWER_MEMO_SECONDS). Not for a signed request
        or nginx's retry (they decide on more than the record), nor without a record (the
        disk decides then)."""
        started = time.monotonic()
        memo = self._memo
        slot = (mode, method, raw_key)
        if memo is not None and not retry and not query:
            kept = memo.get(slot)
            if kept is not None and kept.until > started:
                try:
                    record = await self.reader.get(kept.record.key)
                except StateUnavailable:
                    record = None
                if record is kept.record:
                    metrics.decided(kept.kind, time.monotonic() - started)
                    return cast(Answer, kept.answer)
        decision, record = await self._lookup(raw_key, method=method, retry=retry, query=query)
        answer = make(decision)
        if memo is not None and record is not None and not retry and not query:
            if len(memo) >= ANSWER_MEMO_SIZE:
                memo.clear()
            memo[slot] = _Memo(record, decision.kind, answer, started + ANSWER_MEMO_SECONDS)
        metrics.decided(decision.kind, time.monotonic() - started)
        return answer

    async def lookup(
        self, raw_key: str, *, method: str = "GET", retry: bool = False, query: str = ""
    ) -> Decision:
        """Where the file ``raw_key`` is served from now."""
        decision, _ = await self._lookup(raw_key, method=method, retry=retry, query=query)
        return decision

    async def _lookup(
        self, raw_key: str, *, method: str, retry: bool, query: str
    ) -> tuple[Decision, FileRecord | None]:
        """:meth:`lookup`, and the record it decided on."""
        try:
            key = validate_key(raw_key)
        except InvalidKey:
            return MISSING, None
        stores = self.stores

        def remote_url(name: str, shown: Shown, private: bool) -> str:
            return stores.remote.url(
                name,
                method=method,
                content_type=shown.content_type,
                disposition=shown.disposition,
                private=private,
            )

        def local_exists() -> bool:
            return stores.local.exists(key)

        signed = bool(query) and check_file_query(self.config.secret, key, query, method=method)
        try:
            record = await self.reader.get(key)
        except StateUnavailable as exc:
            self._redis_warning.warning(
                "resolver: Redis unavailable (%s); falling back to disk, then S3", exc
            )
            private = is_private(key, None, self.private_globs)
            if private and not signed:
                return FORBIDDEN, None
            return await anyio.to_thread.run_sync(self._degraded, key, method, private), None
        decision = decide(
            record,
            key,
            node_id=self.config.node_id,
            remote_url=remote_url,
            local_exists=local_exists,
            redirect_max_age=self.redirect_max_age,
            inline_types=self.inline_types,
            private_globs=self.private_globs,
            signed=signed,
            retry=retry,
        )
        if should_ask_s3(decision, record, retry=retry):
            name = key if record is None else record.object
            private = is_private(key, record, self.private_globs)
            decision = await anyio.to_thread.run_sync(self._from_s3, key, name, method, private)
        elif decision.kind == "peer":
            decision = dataclasses.replace(decision, peer=await self._peer_address(decision.peer))
        return decision, record

    async def _peer_address(self, netloc: str) -> str:
        """A peer's ``host:port`` with the host as an address: nginx proxies to peers through
        a variable, which it cannot resolve without a DNS ``resolver`` (and never from
        /etc/hosts). Resolved here as any program does, and kept for PEER_DNS_TTL."""
        host, _, port = netloc.rpartition(":")
        bare = host.strip("[]")
        if not host or _is_address(bare):
            return netloc
        now = time.monotonic()
        cached = self._peer_addresses.get(bare)
        if cached is not None and cached[1] > now:
            return f"{cached[0]}:{port}"
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                bare, int(port), type=socket.SOCK_STREAM
            )
        except (OSError, ValueError) as exc:
            log.warning("resolver: cannot resolve peer %s: %s", bare, exc)
            return netloc  # nginx then cannot reach it: a 503 with Retry-After
        address = str(infos[0][4][0])
        shown = f"[{address}]" if ":" in address else address
        self._peer_addresses[bare] = (shown, now + PEER_DNS_TTL)
        return f"{shown}:{port}"

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

    def _from_s3(self, key: str, name: str, method: str, private: bool) -> Decision:
        now = time.monotonic()
        if self._misses.get(name, 0.0) > now:
            return MISSING
        found = self._s3_has(name)
        if found:
            url = self._unknown_url(name, method, private)
            return Decision("redirect", key=key, url=url, private=private)
        if found is None:
            return MISSING
        if len(self._misses) > 10_000:
            self._misses.clear()
        self._misses[name] = now + 5.0  # recent misses are remembered briefly
        return MISSING

    def _degraded(self, key: str, method: str, private: bool) -> Decision:
        if self.stores.local.exists(key):
            return Decision(
                "local",
                key=key,
                content_type=UNKNOWN.content_type,
                disposition=UNKNOWN.disposition,
                private=private,
            )
        if self._s3_has(key):
            url = self._unknown_url(key, method, private)
            return Decision("redirect", key=key, url=url, max_age=0, private=private)
        return MISSING

    def _unknown_url(self, name: str, method: str, private: bool) -> str:
        """An S3 URL for a file without a record: nothing is known of it, so the safe way."""
        return self.stores.remote.url(
            name,
            method=method,
            content_type=UNKNOWN.content_type,
            disposition=UNKNOWN.disposition,
            private=private,
        )

    def _signed(self, decision: Decision) -> str:
        return signed_query(self.config.secret, decision.key, version=decision.version)

    def x_accel(self, decision: Decision) -> tuple[int, render.RawHeaders, bytes]:
        signed = self._signed(decision) if decision.kind == "peer" else ""
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
        query = scope.get("query_string", b"").decode("latin-1")
        answer = await self._memoized(
            "x-accel", raw_key, scope["method"], self.x_accel, retry=retry, query=query
        )
        await _send(send, *answer)

    async def _auth(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, headers = await self.auth_answer(asked)
        await _send(send, status, headers, b"")

    async def auth_answer(self, headers: Mapping[str, str]) -> tuple[int, render.RawHeaders]:
        """The auth_request answer for the original request nginx describes."""
        original = headers.get("x-original-uri", "")
        raw_path, _, query = original.partition("?")
        path = unquote(raw_path)
        if not path.startswith(self.public_path):
            return 200, render.AUTH_NOT_OURS
        retry = headers.get("x-qp-retry") == "1"
        method = headers.get("x-original-method", "GET")
        return await self._memoized(
            "auth",
            path[len(self.public_path) :],
            method,
            self._auth_render,
            retry=retry,
            query=query,
        )

    def _auth_render(self, decision: Decision) -> tuple[int, render.RawHeaders]:
        signed = self._signed(decision) if decision.kind == "peer" else ""
        return render.auth_answer(decision, redirect_ttl=self.redirect_ttl, signed_query=signed)

    async def _tus_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            peer = await self.tus_peer(asked)
        except StateUnavailable as exc:
            # Not a 404 (the client would start again from zero): nginx answers 503.
            self._redis_warning.warning(
                "resolver: Redis unavailable (%s); tus request not routed", exc
            )
            await _send(send, 503, [(b"content-length", b"0")], b"")
            return
        headers: render.RawHeaders = [(b"content-length", b"0"), (b"cache-control", b"no-store")]
        if peer:
            headers += [(b"x-qp-tus-upstream", peer.encode()), (b"x-qp-tus-hop", b"1")]
        else:
            headers.append((b"x-qp-tus-upstream", b"qproxy_app"))
        await _send(send, 200, headers, b"")

    async def tus_peer(self, headers: Mapping[str, str]) -> str:
        """The ``host:port`` of the node holding the tus upload nginx asks about; "" when it
        is this node's, or no live node's (this node's app then answers 404: start again)."""
        tus_path = self.config.tus_path
        path = unquote(headers.get("x-original-uri", "").partition("?")[0])
        if not tus_path or not path.startswith(tus_path) or headers.get("x-qp-tus-hop"):
            return ""  # (a request another node sent on is this node's: never sent on again)
        tag = tus.holder(headers.get("x-original-method", "GET"), path[len(tus_path) :], headers)
        if tag is None or tag == tus.node_tag(self.config.node_id):
            return ""
        node = await anyio.to_thread.run_sync(nodes.holding_tus, self.stores, tag)
        if node is None:
            return ""
        where = urlsplit(node.tus_url)
        port = where.port or (443 if where.scheme == "https" else 80)
        host = where.hostname or ""
        return await self._peer_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    # -- standalone (no nginx): the resolver sends the bytes itself -----------------------

    async def _standalone_file(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        raw_key = scope["path"][len(self.public_path) :]
        query = scope.get("query_string", b"").decode("latin-1")
        decision = await self.counted(raw_key, method=request.method, query=query)
        response: Response
        if decision.kind == "local":
            path = self.stores.local.path_for(decision.key)
            if not self.stores.local.exists(decision.key):  # (a link is no stored file)
                decision = await self.lookup(
                    decision.key, method=request.method, retry=True, query=query
                )
                await _send(send, *self.x_accel(decision))
                return
            headers = {
                "Cache-Control": "private, max-age=60",
                "X-Content-Type-Options": NOSNIFF,
                "Content-Security-Policy": MEDIA_CSP,
            }
            if decision.disposition:
                headers["Content-Disposition"] = decision.disposition
            response = FileResponse(path, media_type=decision.content_type, headers=headers)
        elif decision.kind == "peer":
            url = (
                f"http://{decision.peer}/internal/blob/{quote(decision.key, safe='/')}"
                f"?{self._signed(decision)}"
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

    async def _blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/internal/blob/``. Asked by this node's nginx (its /internal/blob/ location sets
        X-QP-Blob-Send): where nginx finds the file, which it sends itself (it refuses a
        link and answers 404 for a file gone). Asked directly: :meth:`blob` sends it."""
        for name, value in scope["headers"]:
            if name == b"x-qp-blob-send" and value == b"1":
                break
        else:
            await self._blob_file(scope, receive, send)
            return
        key = scope["path"][len("/internal/blob/") :]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        status, shown = await self.blob_verdict(key, query)
        if status == 403:
            await _send(send, *_FORBIDDEN)
            return
        if status != 200:
            await _send(send, *render.MISSING_ANSWER)
            return
        headers: render.RawHeaders = [
            (b"content-length", b"0"),
            (b"content-type", shown.content_type.encode("latin-1", "replace")),
            (b"x-accel-redirect", (BLOB_PREFIX + quote(key, safe="/")).encode("latin-1")),
        ]
        if shown.disposition:
            headers.append((b"content-disposition", shown.disposition.encode("latin-1")))
        await _send(send, 200, headers, b"")

    async def blob_verdict(self, key: str, query: Mapping[str, str]) -> tuple[int, Shown]:
        """Whether the blob URL for ``key`` with ``query`` may be served (200, and how the
        file is shown), 403 (no valid signature) or 404: a signed, expiring URL for one
        version of the key, which a delete or a newer upload revokes at once."""
        try:
            validate_key(key)
        except InvalidKey:
            return 404, UNKNOWN
        version = query.get("v", "")
        if not version.isdigit() or not check_signature(
            self.config.secret, key, query.get("exp", ""), query.get("sig", ""), scope=f"v{version}"
        ):
            return 403, UNKNOWN
        # No thread hops: a peer's nginx asks for every byte its clients get from this
        # node, and under load a hop per request cost most of the time (make bench,
        # "serve 64 KiB held by another web node"; the blob URL alone: 3.0k -> 8.9k req/s).
        try:
            record = await self.reader.get(key)
        except StateUnavailable:
            return 200, UNKNOWN  # Redis down: the signature alone vouches (minutes at most)
        if record is None or record.state in ("deleted", "pending"):
            return 404, UNKNOWN
        if record.version != int(version):
            return 404, UNKNOWN
        return 200, shown_as(record.content_type, record.filename, inline_types=self.inline_types)

    async def blob(self, request: Request) -> Response:
        """A local file for another node's worker or nginx (:meth:`blob_verdict`), sent by
        the resolver itself."""
        key = request.scope["path"][len("/internal/blob/") :]
        status, shown = await self.blob_verdict(key, request.query_params)
        if status == 403:
            return PlainTextResponse("forbidden\n", status_code=403)
        if status != 200:
            return PlainTextResponse("not found\n", status_code=404)
        path = self.stores.local.path_for(key)
        if not self.stores.local.exists(key):  # (a link is no stored file)
            return PlainTextResponse("not found\n", status_code=404)
        try:
            stat = os.stat(path)  # (a local disk's inode: as quick as the check above)
        except FileNotFoundError:
            return PlainTextResponse("not found\n", status_code=404)
        # As nginx serves the same file on its own node: its ETag, Range (at most as many
        # ranges as nginx allows), HEAD, and 304 for a copy the client has.
        headers = {
            "ETag": f'"{int(stat.st_mtime):x}-{stat.st_size:x}"',
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        }
        if _not_modified(request, headers["ETag"], stat.st_mtime):
            return Response(status_code=304, headers=headers)
        return _Blob(
            path,
            stat_result=stat,
            media_type=shown.content_type,
            headers={
                **headers,
                "Content-Disposition": shown.disposition,
                "X-Content-Type-Options": NOSNIFF,
                "Content-Security-Policy": MEDIA_CSP,
            },
        )

    async def healthz(self, request: Request) -> Response:
        """Liveness: this process answers (asks nothing else: a load balancer or systemd
        restarting it over S3 being down would make things worse)."""
        return JSONResponse({"status": "ok", "node": self.config.node_id})

    async def readyz(self, request: Request) -> Response:
        """Readiness: can this node serve files? 503 only when it cannot (its local root
        unreadable) or should not (draining); Redis or S3 down is reported as degraded, not
        as unready: files are still served (from disk, then S3, without Redis; local and
        peer files without S3)."""
        local_ok = await anyio.to_thread.run_sync(self._local_readable)
        redis_ok = await anyio.to_thread.run_sync(self.stores.state.ping)
        s3_ok = await anyio.to_thread.run_sync(self.remote.ping)
        draining = await anyio.to_thread.run_sync(nodes.is_draining, self.stores)
        degraded = [name for name, ok in (("redis", redis_ok), ("s3", s3_ok)) if not ok]
        ready = local_ok and not draining
        body = {
            "ready": ready,
            "degraded": degraded,
            "local": local_ok,
            "redis": redis_ok,
            "s3": s3_ok,
            "draining": draining,
            "node": self.config.node_id,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    def _local_readable(self) -> bool:
        return os.access(self.config.local_path, os.R_OK | os.X_OK)

    async def metrics(self, request: Request) -> Response:
        """Every process of this node, summed (qproxy.metrics), and the cluster's records
        by state (read from Redis now)."""
        metrics.flush()  # (this process's latest answers)
        try:
            census = await anyio.to_thread.run_sync(self.stores.state.census, _INDEXED)
        except StateUnavailable:
            census = {}
        body, kind = await anyio.to_thread.run_sync(metrics.exposition, lambda: _gauges(census))
        return Response(body, media_type=kind)

    # -- lifespan: the janitor ------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._janitor_task = asyncio.create_task(self._janitor())
                self._heartbeat_task = asyncio.create_task(self._heartbeat())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in (self._janitor_task, self._heartbeat_task):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                metrics.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _heartbeat(self) -> None:
        """Register this node every janitor interval, apart from the janitor (whose rounds
        can take long when S3 is slow: a node is not gone while it sweeps)."""
        while True:
            try:
                await anyio.to_thread.run_sync(nodes.heartbeat, self.stores)
            except Exception as exc:  # Redis down: the next round registers it
                log.debug("heartbeat: %s", exc)
            await asyncio.sleep(self.config.janitor_interval)

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


_INDEXED: tuple[State, ...] = ("pending", "local", "queued", "transferring", "failed")


def _gauges(
    census: Mapping[State, tuple[int, float | None]],
) -> list[tuple[str, str, dict[str, str], float]]:
    now = time.time()
    out = [
        (
            "qproxy_records",
            "Records by state, cluster-wide (remote ones are not indexed, so not counted).",
            {"state": str(state)},
            float(count),
        )
        for state, (count, _) in census.items()
    ]
    waiting = [when for state, (_, when) in census.items() if state != "pending" and when]
    out.append(
        (
            "qproxy_oldest_unsent_seconds",
            "Seconds since the file not yet in S3 that waits longest last changed state.",
            {},
            max(0.0, now - min(waiting)) if waiting else 0.0,
        )
    )
    out.append(
        (
            "qproxy_state_reachable",
            "1 when Redis answered this scrape's questions, 0 when not.",
            {},
            1.0 if census else 0.0,
        )
    )
    return out


async def _send(send: Send, status: int, headers: render.RawHeaders, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: Config | None = None, *, standalone: bool | None = None) -> ASGIApp:
    """The resolver as an ASGI app (``uvicorn --factory qproxy.resolver:create_app``)."""
    return Resolver(config, standalone=standalone)
