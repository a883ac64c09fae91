"""Where the bytes of a GET come from, and how nginx is told: no I/O.

:func:`decide` turns a record into a plain :class:`Decision`; :func:`x_accel` and
:func:`auth_answer` render one into what nginx acts on (an X-Accel-Redirect answer, or the
headers of an auth_request answer). Headers that do not depend on the request are built
once, here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlsplit

from qproxy.config import DEFAULT_INLINE_TYPES
from qproxy.core.record import LOCAL_STATES, FileRecord
from qproxy.headers import content_disposition

LOCAL_PREFIX = "/_qp/local/"
PEER_PREFIX = "/_qp/peer/"
# Where a node's nginx sends a file of its own that another node asked for.
BLOB_PREFIX = "/_qp/blob/"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# How long nginx's micro-cache (``qproxy nginx-config --micro-cache``) may reuse an answer,
# sent as X-Accel-Expires (nginx hides it from clients). A local answer goes stale when the
# copy is dropped, which nginx's retry covers; misses are never cached (a file may arrive
# any moment).
LOCAL_DECISION_TTL = b"1"
NO_CACHE = b"0"

RawHeaders = list[tuple[bytes, bytes]]

# Types not in QPROXY_INLINE_TYPES (HTML, SVG, XML, JavaScript, unknown types) are served as
# an attachment of type SAFE_TYPE, so an upload can never run script in the app's origin.
SAFE_TYPE = "application/octet-stream"
# On every file answer: no type sniffing, and nothing in it may run or load anything.
# At most this many ranges per request, wherever a file's bytes are served from: 600
# ranges of a 12 kB file used to answer 54 kB.
MAX_RANGES = 16
NOSNIFF = "nosniff"
MEDIA_CSP = (
    "default-src 'none'; img-src 'self' data:; media-src 'self'; style-src 'unsafe-inline'; sandbox"
)


@dataclass(frozen=True, slots=True)
class Shown:
    """How a stored file is served: its Content-Type and Content-Disposition."""

    content_type: str
    disposition: str


@functools.lru_cache(maxsize=4096)
def shown_as(content_type: str, filename: str, *, inline_types: tuple[str, ...]) -> Shown:
    """Inline with its own type if ``inline_types`` allows it, else an attachment of a type
    no browser runs. (Remembered: the resolver asks for every request, and hot files are
    few; 4 us of its ~60 us per request, make bench.)"""
    mimetype = content_type.split(";", 1)[0].strip().lower()
    if any(fnmatch.fnmatchcase(mimetype, pattern) for pattern in inline_types):
        return Shown(content_type, content_disposition(filename, disposition="inline"))
    return Shown(SAFE_TYPE, content_disposition(filename, disposition="attachment"))


# A file whose record is gone (Redis lost it): nothing known of it, so the safe way.
UNKNOWN = Shown(SAFE_TYPE, "attachment")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the bytes of one request come from."""

    kind: Literal["local", "peer", "redirect", "missing", "forbidden"]
    key: str = ""
    peer: str = ""  # host:port of the node holding the file
    url: str = ""  # redirect target
    content_type: str = "application/octet-stream"
    disposition: str = ""
    max_age: int = 0
    version: int = 1  # the record's version (signed into a peer's blob URL)
    sha256: str = ""  # a peer's file: its content hash (nginx's --peer-cache key)
    private: bool = False  # served only when signed: never cached for others


MISSING = Decision("missing")
FORBIDDEN = Decision("forbidden")


def is_private(key: str, record: FileRecord | None, private_globs: tuple[str, ...]) -> bool:
    """Served only with a signed URL: by its key (QPROXY_PRIVATE_PREFIXES) or its record."""
    if record is not None and record.private:
        return True
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in private_globs)


def decide(
    record: FileRecord | None,
    key: str,
    *,
    node_id: str,
    remote_url: Callable[[str, Shown, bool], str],
    local_exists: Callable[[], bool],
    redirect_max_age: int,
    inline_types: tuple[str, ...] = DEFAULT_INLINE_TYPES,
    private_globs: tuple[str, ...] = (),
    signed: bool = False,
    retry: bool = False,
) -> Decision:
    """The routing rule. ``retry`` is set when nginx found the local file gone; ``signed``
    when the request carries a valid signature for the key (:func:`qproxy.sign_url`).

    ``remote_url(object, shown, private)`` is the S3 URL that serves the object the way
    ``shown`` says (a short presigned one for a private file).
    """
    private = is_private(key, record, private_globs)
    if private and not signed:
        return FORBIDDEN
    decision = _decide(
        record,
        key,
        node_id=node_id,
        remote_url=lambda name, shown: remote_url(name, shown, private),
        local_exists=local_exists,
        redirect_max_age=0 if private else redirect_max_age,
        inline_types=inline_types,
        retry=retry,
    )
    if private and decision.kind != "missing":
        return dataclasses.replace(decision, private=True)
    return decision


def _decide(
    record: FileRecord | None,
    key: str,
    *,
    node_id: str,
    remote_url: Callable[[str, Shown], str],
    local_exists: Callable[[], bool],
    redirect_max_age: int,
    inline_types: tuple[str, ...],
    retry: bool,
) -> Decision:
    if record is None:
        # Never 404 while a copy exists: an accepted file whose record Redis lost.
        if not retry and local_exists():
            return Decision(
                "local", key=key, content_type=UNKNOWN.content_type, disposition=UNKNOWN.disposition
            )
        return MISSING
    if record.state in ("deleted", "pending"):
        return MISSING
    shown = shown_as(record.content_type, record.filename, inline_types=inline_types)
    if record.state == "remote":
        url = remote_url(record.object, shown)
        return Decision("redirect", key=key, url=url, max_age=redirect_max_age)
    if retry or record.state not in LOCAL_STATES:
        # nginx found no local file although the record says local: nothing to send yet.
        return MISSING
    ctype, disposition = shown.content_type, shown.disposition
    if record.node == node_id or not record.node_url:
        return Decision("local", key=key, content_type=ctype, disposition=disposition)
    peer = urlsplit(record.node_url).netloc
    return Decision(
        "peer",
        key=key,
        peer=peer,
        content_type=ctype,
        disposition=disposition,
        version=record.version,
        sha256=record.sha256 if _SHA256.fullmatch(record.sha256) else "",
    )


def should_ask_s3(decision: Decision, record: FileRecord | None, *, retry: bool) -> bool:
    """A miss that S3 may still answer: Redis lost the record (a new instance, FLUSHALL),
    or nginx found the local copy gone. A file is never a 404 while a copy exists."""
    if decision.kind != "missing":
        return False
    return record is None or (retry and record.state not in ("deleted", "pending"))


def peer_target(decision: Decision, signed_query: str) -> str:
    """The internal location that proxies to the node holding the file. ``h``, the bytes'
    SHA-256, is what nginx's peer cache keys them by (the same bytes, whoever signed)."""
    target = f"{PEER_PREFIX}{decision.peer}/{quote(decision.key, safe='/')}?{signed_query}"
    return f"{target}&h={decision.sha256}" if decision.sha256 else target


FORBIDDEN_ANSWER: tuple[int, RawHeaders, bytes] = (
    403,
    [
        (b"content-length", b"10"),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-accel-expires", b"0"),
        (b"cache-control", b"no-store"),
    ],
    b"forbidden\n",
)

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
            (b"x-accel-expires", NO_CACHE if decision.private else LOCAL_DECISION_TTL),
            (b"x-accel-redirect", target.encode("latin-1")),
        ]
        if decision.disposition:
            headers.append((b"content-disposition", decision.disposition.encode("latin-1")))
        return 200, headers, b""
    if kind == "redirect":
        return (
            302,
            [
                (b"content-length", b"0"),
                (b"x-accel-expires", NO_CACHE if decision.private else redirect_ttl),
                (b"location", decision.url.encode("latin-1")),
                (b"cache-control", _redirect_cache(decision)),
            ],
            b"",
        )
    if kind == "forbidden":
        return FORBIDDEN_ANSWER
    return MISSING_ANSWER


def _redirect_cache(decision: Decision) -> bytes:
    """How long a client may reuse a redirect to S3 (never, for a private file)."""
    return f"private, max-age={decision.max_age}".encode() if decision.max_age else b"no-store"


AUTH_NOT_OURS: RawHeaders = [(b"content-length", b"0"), (b"x-accel-expires", NO_CACHE)]


def auth_answer(
    decision: Decision, *, redirect_ttl: bytes, signed_query: str = ""
) -> tuple[int, RawHeaders]:
    """The status and headers that answer nginx's auth_request subrequest.

    auth_request allows only 2xx/401/403 (anything else becomes a 500 in nginx), so every
    outcome but a refusal (403, which nginx passes on) is a 200 and the X-QP-* headers say
    what to do; none of them: 404.
    """
    kind = decision.kind
    if kind == "forbidden":
        return 403, AUTH_NOT_OURS
    if kind == "missing":
        return 200, AUTH_NOT_OURS
    ttl = redirect_ttl if kind == "redirect" else LOCAL_DECISION_TTL
    if decision.private:
        ttl = NO_CACHE
    out = [(b"content-length", b"0"), (b"x-accel-expires", ttl)]
    if kind == "local":
        out.append((b"x-qp-path", ("/" + decision.key).encode()))
    elif kind == "peer":
        out.append((b"x-qp-peer", peer_target(decision, signed_query).encode("latin-1")))
    else:
        out.append((b"x-qp-location", decision.url.encode("latin-1")))
        out.append((b"x-qp-cache-control", _redirect_cache(decision)))
    if kind in ("local", "peer"):
        out.append((b"x-qp-content-type", decision.content_type.encode("latin-1", "replace")))
        if decision.disposition:
            out.append((b"x-qp-disposition", decision.disposition.encode("latin-1")))
    return 200, out
