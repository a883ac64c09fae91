"""The tus 1.0.0 resumable upload protocol, without I/O: requests in, answers out.

https://tus.io/protocols/resumable-upload: a client creates an upload (POST, with its
length or ``Upload-Defer-Length``), sends its bytes in PATCH requests at the offset the
server holds (HEAD tells it after a break), and may terminate it (DELETE). This module
parses what a request asks (:func:`parse`), checks it against an upload's state
(:class:`Upload`), and builds every answer the protocol prescribes; the stores keep the
bytes and the state (:mod:`qproxy.lifecycle.tus`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Literal

from qproxy.core.upload import Answer

VERSION = "1.0.0"
EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "checksum",
    "termination",
    "concatenation",
)
# sha1 is the one the protocol requires; the others as clients send them.
CHECKSUMS = ("sha1", "md5", "sha256", "crc32")
OFFSET_TYPE = "application/offset+octet-stream"
# Upload ids: made by the server (the node's id, a dot, 24 random URL-safe characters).
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{16,64}")
_METADATA_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
MAX_METADATA_BYTES = 4096
MAX_PARTS = 1000  # partial uploads in one concatenation
_NODE_TAG = re.compile(r"[^A-Za-z0-9_-]")


def node_tag(node_id: str) -> str:
    """How an upload's id names the node that holds it (the part before the dot)."""
    return _NODE_TAG.sub("-", node_id)[:64] or "node"


Kind = Literal["options", "create", "head", "patch", "delete"]


class TusRefusal(Exception):
    """A request the protocol answers with an error status."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers

    def answer(self) -> Answer:
        return answer(self.status, self.headers, self.reason + "\n")


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes


@dataclass(frozen=True)
class TusCall:
    """What a tus request asks."""

    kind: Kind
    upload_id: str = ""
    length: int | None = None  # Upload-Length (None: not given)
    defer_length: bool = False
    offset: int | None = None  # Upload-Offset
    metadata: str = ""  # Upload-Metadata as sent (kept, and given back by HEAD)
    checksum: Checksum | None = None
    body_length: int | None = None  # Content-Length of a body to append
    concat: str = ""  # Upload-Concat: "partial", "final" (of ``parts``), or ""
    parts: tuple[str, ...] = ()


@dataclass
class Upload:
    """An upload's state, as the node keeps it (its bytes so far are ``offset``)."""

    upload_id: str
    length: int | None
    offset: int = 0
    metadata: str = ""
    expires: float = 0.0
    concat: str = ""
    parts: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.length is not None and self.offset == self.length

    @property
    def is_partial(self) -> bool:
        """A part of a later concatenation: complete, it waits for its final upload."""
        return self.concat == "partial"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value is not None else None


def _number(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise TusRefusal(400, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_metadata(value: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be
    absent). Values that are not UTF-8 are kept as their base64 text."""
    if len(value) > MAX_METADATA_BYTES:
        raise TusRefusal(400, f"Upload-Metadata is over {MAX_METADATA_BYTES} bytes")
    out: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, encoded = item.partition(" ")
        if not _METADATA_KEY.fullmatch(key) or key in out:
            raise TusRefusal(400, f"Upload-Metadata: bad or repeated key {key[:64]!r}")
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TusRefusal(400, f"Upload-Metadata: {key}: not base64") from exc
        try:
            out[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            out[key] = encoded.strip()
    return out


def _checksum(headers: Mapping[str, str]) -> Checksum | None:
    value = _header(headers, "upload-checksum")
    if value is None:
        return None
    algorithm, _, encoded = value.partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUMS:
        raise TusRefusal(
            400, f"Upload-Checksum: {algorithm!r} is not one of {', '.join(CHECKSUMS)}"
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TusRefusal(400, "Upload-Checksum: the digest is not base64") from exc
    return Checksum(algorithm, digest)


def parse(method: str, rest: str, headers: Mapping[str, str], *, max_size: int) -> TusCall:
    """What ``method`` on the tus path plus ``rest`` asks (``headers`` with lower-case
    names). Raises :class:`TusRefusal` with the protocol's status."""
    method = headers.get("x-http-method-override", method).upper()
    upload_id = rest.strip("/")
    if method == "OPTIONS":
        return TusCall("options")
    if _header(headers, "tus-resumable") != VERSION:
        raise TusRefusal(412, "Tus-Resumable 1.0.0 is required", (("Tus-Version", VERSION),))
    if upload_id and not _ID.fullmatch(upload_id):
        raise TusRefusal(404, "no such upload")
    if method == "POST":
        if upload_id:
            raise TusRefusal(405, "POST creates uploads at the tus path itself")
        concat, parts = _concat(headers)
        if concat == "final":
            if _header(headers, "upload-length") is not None or _number(headers, "content-length"):
                raise TusRefusal(400, "a final upload has no Upload-Length and no body")
            metadata = _header(headers, "upload-metadata") or ""
            parse_metadata(metadata)
            return TusCall("create", metadata=metadata, concat="final", parts=parts, offset=0)
        length = _number(headers, "upload-length")
        defer = _header(headers, "upload-defer-length")
        if defer is not None and defer != "1":
            raise TusRefusal(400, "Upload-Defer-Length must be 1")
        if (length is None) == (defer is None):
            raise TusRefusal(400, "give Upload-Length or Upload-Defer-Length: 1 (one of them)")
        if length is not None and length > max_size:
            raise TusRefusal(413, f"Upload-Length is over the limit of {max_size} bytes")
        metadata = _header(headers, "upload-metadata") or ""
        parse_metadata(metadata)
        body_length = _number(headers, "content-length")
        if body_length:
            _patch_type(headers)
        return TusCall(
            "create",
            length=length,
            defer_length=defer is not None,
            metadata=metadata,
            checksum=_checksum(headers),
            body_length=body_length,
            offset=0,
            concat=concat,
        )
    if not upload_id:
        raise TusRefusal(405, f"{method} needs an upload's URL", (("Allow", "POST, OPTIONS"),))
    if method == "HEAD":
        return TusCall("head", upload_id=upload_id)
    if method == "DELETE":
        return TusCall("delete", upload_id=upload_id)
    if method == "PATCH":
        _patch_type(headers)
        offset = _number(headers, "upload-offset")
        if offset is None:
            raise TusRefusal(400, "Upload-Offset is required")
        return TusCall(
            "patch",
            upload_id=upload_id,
            offset=offset,
            length=_number(headers, "upload-length"),
            checksum=_checksum(headers),
            body_length=_number(headers, "content-length"),
        )
    raise TusRefusal(405, f"{method} is not part of tus", (("Allow", "HEAD, PATCH, DELETE"),))


def holder(method: str, rest: str, headers: Mapping[str, str]) -> str | None:
    """The tag of the node holding the upload that a request on the tus path (plus ``rest``)
    is about: its own for HEAD, PATCH and DELETE, its first part's for a concatenation.
    None: no upload yet (a creation, OPTIONS) or a request the node's own app refuses."""
    method = headers.get("x-http-method-override", "") or method
    upload_id = rest.strip("/")
    if not upload_id and method.upper() == "POST":
        try:
            kind, parts = _concat(headers)
        except TusRefusal:
            return None
        upload_id = parts[0] if kind == "final" else ""
    if not _ID.fullmatch(upload_id):
        return None
    return upload_id.partition(".")[0]


def _concat(headers: Mapping[str, str]) -> tuple[str, tuple[str, ...]]:
    """``Upload-Concat``: ``partial``, or ``final;URL URL ...`` (the partial uploads, in
    order, by their URLs or paths)."""
    value = _header(headers, "upload-concat")
    if value is None:
        return "", ()
    if value == "partial":
        return "partial", ()
    kind, _, urls = value.partition(";")
    if kind.strip() != "final" or not urls.strip():
        raise TusRefusal(400, "Upload-Concat must be 'partial' or 'final;URL URL...'")
    parts = []
    for url in urls.split():
        upload_id = url.rstrip("/").rsplit("/", 1)[-1]
        if not _ID.fullmatch(upload_id):
            raise TusRefusal(400, f"Upload-Concat: {url[:100]!r} is not an upload of this server")
        parts.append(upload_id)
    if len(parts) > MAX_PARTS:
        raise TusRefusal(400, f"Upload-Concat: more than {MAX_PARTS} parts")
    return "final", tuple(parts)


def _patch_type(headers: Mapping[str, str]) -> None:
    content_type = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
    if content_type != OFFSET_TYPE:
        raise TusRefusal(415, f"Content-Type must be {OFFSET_TYPE}")


def check_patch(call: TusCall, upload: Upload, *, max_size: int) -> int | None:
    """Whether ``call`` may append to ``upload``; returns the length it sets (a deferred
    length given now), else None. Raises :class:`TusRefusal` (409 wrong offset, 413 past
    the length)."""
    assert call.offset is not None
    if upload.concat == "final":
        raise TusRefusal(403, "a final upload cannot be patched")
    if call.offset != upload.offset:
        raise TusRefusal(
            409,
            f"Upload-Offset is {call.offset}, the upload is at {upload.offset}",
            (("Upload-Offset", str(upload.offset)),),
        )
    new_length = None
    if call.length is not None:
        if upload.length is not None and call.length != upload.length:
            raise TusRefusal(400, "Upload-Length cannot change once set")
        if call.length > max_size:
            raise TusRefusal(413, f"Upload-Length is over the limit of {max_size} bytes")
        if call.length < upload.offset:
            raise TusRefusal(400, "Upload-Length is below the bytes already received")
        new_length = call.length if upload.length is None else None
    length = upload.length if upload.length is not None else call.length
    body = call.body_length
    if length is not None and body is not None and upload.offset + body > length:
        raise TusRefusal(413, "the body goes past Upload-Length")
    return new_length


def room(upload: Upload, *, max_size: int) -> int:
    """How many more bytes the upload may take."""
    limit = upload.length if upload.length is not None else max_size
    return max(0, limit - upload.offset)


def answer(status: int, headers: tuple[tuple[str, str], ...] = (), body: str = "") -> Answer:
    data = body.encode()
    base: tuple[tuple[str, str], ...] = (
        ("Tus-Resumable", VERSION),
        ("Cache-Control", "no-store"),
        ("Content-Length", str(len(data))),
    )
    if data:
        base += (("Content-Type", "text/plain; charset=utf-8"),)
    return Answer(status, base + headers, data)


def options_answer(*, max_size: int) -> Answer:
    return answer(
        204,
        (
            ("Tus-Version", VERSION),
            ("Tus-Extension", ",".join(EXTENSIONS)),
            ("Tus-Max-Size", str(max_size)),
            ("Tus-Checksum-Algorithm", ",".join(CHECKSUMS)),
        ),
    )


def _expires(when: float) -> tuple[tuple[str, str], ...]:
    if not when:
        return ()
    return (("Upload-Expires", formatdate(when, usegmt=True)),)


def head_answer(upload: Upload) -> Answer:
    headers: tuple[tuple[str, str], ...] = (("Upload-Offset", str(upload.offset)),)
    if upload.length is None:
        headers += (("Upload-Defer-Length", "1"),)
    else:
        headers += (("Upload-Length", str(upload.length)),)
    if upload.metadata:
        headers += (("Upload-Metadata", upload.metadata),)
    if upload.concat == "partial":
        headers += (("Upload-Concat", "partial"),)
    elif upload.concat == "final":
        headers += (("Upload-Concat", "final;" + " ".join(upload.parts)),)
    return answer(200, headers + _expires(upload.expires))


def created_answer(location: str, upload: Upload, *, with_body: bool) -> Answer:
    headers: tuple[tuple[str, str], ...] = (("Location", location),)
    if with_body:
        headers += (("Upload-Offset", str(upload.offset)),)
    return answer(201, headers + _expires(upload.expires))


def patched_answer(upload: Upload) -> Answer:
    return answer(204, (("Upload-Offset", str(upload.offset)), *_expires(upload.expires)))


def not_taken_answer(status: int) -> Answer:
    """The app answered ``status`` (< 400) to the request that completed an upload without
    reading ``qproxy.uploads`` (or the body): nothing is kept, as for any upload."""
    return answer(
        400,
        body=f"the upload was not kept: the app answered {status} to the request that "
        "completed it without reading qproxy.uploads (or the request body)\n",
    )


def terminated_answer() -> Answer:
    return answer(204)


CHECKSUM_MISMATCH = 460
PHRASES = {CHECKSUM_MISMATCH: "Checksum Mismatch"}


# CORS, for browser clients on another origin (QPROXY_TUS_CORS_ORIGINS).
_ALLOW_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, "
    "Upload-Offset, Upload-Defer-Length, Upload-Concat, Upload-Checksum, "
    "X-HTTP-Method-Override, X-Requested-With"
)
_EXPOSE_HEADERS = (
    "Location, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, "
    "Tus-Checksum-Algorithm, Upload-Offset, Upload-Length, Upload-Metadata, "
    "Upload-Defer-Length, Upload-Concat, Upload-Expires"
)


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The CORS headers for a request from ``origin`` (none unless it is allowed; ``*``
    allows every origin, credentials excluded)."""
    if not origin or not allowed:
        return ()
    if "*" in allowed:
        given = "*"
    elif origin in allowed:
        given = origin
    else:
        return ()
    headers: tuple[tuple[str, str], ...] = (
        ("Access-Control-Allow-Origin", given),
        ("Access-Control-Allow-Methods", "POST, HEAD, PATCH, DELETE, OPTIONS"),
        ("Access-Control-Allow-Headers", _ALLOW_HEADERS),
        ("Access-Control-Expose-Headers", _EXPOSE_HEADERS),
        ("Access-Control-Max-Age", "86400"),
    )
    if given != "*":
        headers += (("Vary", "Origin"),)
    return headers


def with_cors(reply: Answer, origin: str | None, allowed: tuple[str, ...]) -> Answer:
    extra = cors_headers(origin, allowed)
    return Answer(reply.status, reply.headers + extra, reply.body) if extra else reply
