"""Where the bytes of a GET come from, and how nginx is told: no I/O.

:func:`decide` turns a record into a plain :class:`Decision`; :func:`x_accel` and
:func:`auth_answer` render one into what nginx acts on (an X-Accel-Redirect answer, or the
headers of an auth_request answer). Headers that do not depend on the request are built
once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

from qproxy.core.record import LOCAL_STATES, FileRecord
from qproxy.headers import content_disposition

LOCAL_PREFIX = "/_qp/local/"
PEER_PREFIX = "/_qp/peer/"

# How long nginx's micro-cache (``qproxy nginx-config --micro-cache``) may reuse an answer,
# sent as X-Accel-Expires (nginx hides it from clients). A local answer goes stale when the
# copy is dropped, which nginx's retry covers; misses are never cached (a file may arrive
# any moment).
LOCAL_DECISION_TTL = b"1"
NO_CACHE = b"0"

RawHeaders = list[tuple[bytes, bytes]]


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


def should_ask_s3(decision: Decision, record: FileRecord | None, *, retry: bool) -> bool:
    """A miss that S3 may still answer: Redis lost the record (a new instance, FLUSHALL),
    or nginx found the local copy gone. A file is never a 404 while a copy exists."""
    if decision.kind != "missing":
        return False
    return record is None or (retry and record.state not in ("deleted", "pending"))


def peer_target(decision: Decision, signed_query: str) -> str:
    """The internal location that proxies to the node holding the file."""
    return f"{PEER_PREFIX}{decision.peer}/{quote(decision.key, safe='/')}?{signed_query}"


# The answer to every miss, in both modes: built once.
MISSING_ANSWER: tuple[int, RawHeaders, bytes] = (
    404,
    [
        (b"content-length", b"10"),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-accel-expires", NO_CACHE),
        (b"cache-control", b"no-store"),
    ],
    b"not found\n",
)


def x_accel(
    decision: Decision, *, redirect_ttl: bytes, signed_query: str = ""
) -> tuple[int, RawHeaders, bytes]:
    """The X-Accel answer for nginx as raw ASGI parts: status, headers, body.

    ``signed_query`` signs a peer's internal URL (unused for other decisions).
    """
    kind = decision.kind
    if kind == "local" or kind == "peer":
        if kind == "local":
            target = LOCAL_PREFIX + quote(decision.key, safe="/")
        else:
            target = peer_target(decision, signed_query)
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
                (b"x-accel-expires", redirect_ttl),
                (b"location", decision.url.encode("latin-1")),
                (b"cache-control", cache.encode()),
            ],
            b"",
        )
    return MISSING_ANSWER


AUTH_NOT_OURS: RawHeaders = [(b"content-length", b"0"), (b"x-accel-expires", NO_CACHE)]


def auth_answer(decision: Decision, *, redirect_ttl: bytes, signed_query: str = "") -> RawHeaders:
    """The headers of the 200 that answers nginx's auth_request subrequest.

    auth_request allows only 2xx/401/403 (anything else becomes a 500 in nginx), so every
    outcome is a 200 and the X-QP-* headers say what to do; none of them: 404.
    """
    kind = decision.kind
    if kind == "missing":
        return AUTH_NOT_OURS
    ttl = redirect_ttl if kind == "redirect" else LOCAL_DECISION_TTL
    out = [(b"content-length", b"0"), (b"x-accel-expires", ttl)]
    if kind == "local":
        out.append((b"x-qp-path", ("/" + decision.key).encode()))
    elif kind == "peer":
        out.append((b"x-qp-peer", peer_target(decision, signed_query).encode("latin-1")))
    else:
        out.append((b"x-qp-location", decision.url.encode("latin-1")))
    if kind in ("local", "peer"):
        out.append((b"x-qp-content-type", decision.content_type.encode("latin-1", "replace")))
        if decision.disposition:
            out.append((b"x-qp-disposition", decision.disposition.encode("latin-1")))
    return out
