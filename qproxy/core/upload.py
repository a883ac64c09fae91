"""The upload HTTP policy, sans-IO, that both middlewares drive.

:func:`plan` reads a request's headers and says what to do with its body (rewrite a
multipart form, store a raw body, take a body nginx already wrote, or nothing), refusing
what cannot be accepted; :func:`refusal` is the answer to any refused upload; and
:class:`Settle` is the commit rule: the files are kept if the app answered < 400, decided
once, before the first byte of the answer leaves. No sockets, files, Redis or S3 here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import unquote

from werkzeug.http import parse_options_header

from qproxy.core.multipart import (
    MultipartRewriter,
    RawBodyRewriter,
    Rewriter,
    clean_filename,
    multipart_boundary,
)
from qproxy.errors import LengthRequired, MalformedUpload, QProxyError, UploadTooLarge
from qproxy.headers import OFFLOAD_FILE_HEADER, OFFLOAD_TOKEN_HEADER, check_offload_token

UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
RAW_METHODS = frozenset({"POST", "PUT"})
KEY_HEADER = "X-QProxy-Key"
# Headers only qproxy may set for the app (or only nginx for qproxy): never passed on.
PRIVATE_HEADERS = frozenset(
    name.lower() for name in (KEY_HEADER, OFFLOAD_FILE_HEADER, OFFLOAD_TOKEN_HEADER)
)


@dataclass
class StoredFile:
    """A file the middleware stored for the app (``environ["qproxy.uploads"]``).

    What the app sets before it answers is stored with the file: ``meta`` (handed to the
    worker hooks) and ``private`` (served only with a signed URL, :func:`qproxy.sign_url`).
    """

    field: str
    key: str
    filename: str
    content_type: str
    size: int
    sha256: str
    url: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    private: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int
    max_parts: int
    max_form_memory: int


@dataclass(frozen=True, slots=True)
class Policy:
    """What one node accepts."""

    limits: Limits
    raw_paths: tuple[str, ...] = ()
    # Globs of paths where uploads are taken (QPROXY_UPLOAD_PATHS); empty: every path.
    upload_paths: tuple[str, ...] = ()
    # Proves an offloaded body's path comes from nginx (``nginx-config --offload``).
    secret: str = ""


@dataclass(frozen=True, slots=True)
class UploadRequest:
    """What the policy reads of a request; each adapter fills it from its server."""

    method: str
    path: str
    content_type: str | None = None
    content_disposition: str | None = None
    content_length: str | None = None
    # The server delimits the body itself (chunked under WSGI's wsgi.input_terminated, or
    # any ASGI server): no Content-Length is needed.
    framed: bool = False
    body_file: str | None = None
    body_token: str | None = None
    # Header names (lower case) the request carries more than once, where the server lets
    # the adapter see that (ASGI; a WSGI server joins them with commas or keeps one).
    repeated: frozenset[str] = frozenset()


# Headers the middleware and the framework behind it must read alike: sent twice, one could
# take the first and the other the last (the app then parses a file qproxy never saw).
SINGLE_HEADERS = ("content-type", "content-length", "transfer-encoding", "content-disposition")


@dataclass(frozen=True, slots=True)
class Plan:
    """How to take one request's body."""

    rewriter: Rewriter
    # Offload mode: nginx wrote the raw body to this file (None: nginx wrote none, the
    # body was empty). Only meaningful when ``offloaded``.
    body_file: str | None = None
    offloaded: bool = False
    # The declared Content-Length (None: the server frames the body).
    length: int | None = None

    @property
    def raw_key(self) -> str | None:
        """The key of a raw-body upload (sent to the app in ``X-QProxy-Key``)."""
        return self.rewriter.key if isinstance(self.rewriter, RawBodyRewriter) else None


def plan(request: UploadRequest, policy: Policy) -> Plan | None:
    """What to do with ``request``'s body; None: not an upload, pass it through.

    Raises :class:`MalformedUpload` for multipart without a usable boundary or an
    offloaded body that is not nginx's, :class:`LengthRequired` and :class:`UploadTooLarge`
    for a body that cannot be taken by its declared length.
    """
    if request.method not in UPLOAD_METHODS:
        return None
    path = request.path
    if policy.upload_paths and not any(fnmatch.fnmatchcase(path, p) for p in policy.upload_paths):
        return None  # elsewhere the body reaches the app untouched, as without qproxy
    _refuse_ambiguous(request)
    rewriter = _rewriter(request, policy)
    if rewriter is None:
        return None
    if request.body_file or request.body_token:
        # nginx offloads every body on a raw upload path, a multipart form posted there
        # too (then it is parsed from nginx's file).
        if not _raw_path(request.path, policy):
            raise MalformedUpload("an offloaded body is only taken on a raw upload path")
        if not check_offload_token(policy.secret, request.body_token or ""):
            raise MalformedUpload("the offloaded body's token does not match QPROXY_SECRET")
        return Plan(rewriter, body_file=request.body_file or None, offloaded=True)
    length = check_length(
        request.content_length, framed=request.framed, max_body=policy.limits.max_body
    )
    return Plan(rewriter, length=length)


def _raw_path(path: str, policy: Policy) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in policy.raw_paths)


def _refuse_ambiguous(request: UploadRequest) -> None:
    for name in SINGLE_HEADERS:
        if name in request.repeated:
            raise MalformedUpload(f"more than one {name.title()} header")
    # A WSGI server joins repeated headers with commas: a length never has one, and a type
    # has one only inside a quoted parameter.
    if request.content_length and "," in request.content_length:
        raise MalformedUpload("more than one Content-Length header")
    if request.content_type and "," in _unquoted(request.content_type):
        raise MalformedUpload("more than one Content-Type header")


def _unquoted(value: str) -> str:
    """``value`` without its quoted strings."""
    out, quoted, escaped = [], False, False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted:
            out.append(char)
    return "".join(out)


def _rewriter(request: UploadRequest, policy: Policy) -> Rewriter | None:
    method, path = request.method, request.path
    limits = policy.limits
    boundary = multipart_boundary(request.content_type)
    if boundary is not None:
        return MultipartRewriter(
            boundary,
            max_body=limits.max_body,
            max_parts=limits.max_parts,
            max_form_memory=limits.max_form_memory,
        )
    if method in RAW_METHODS and _raw_path(path, policy):
        filename = ""
        if request.content_disposition:
            _, options = parse_options_header(request.content_disposition)
            filename = options.get("filename", "")
        if not filename:
            filename = unquote(path.rstrip("/").rsplit("/", 1)[-1])
        return RawBodyRewriter(
            field="body",
            filename=clean_filename(filename),
            content_type=request.content_type or "",
            max_body=limits.max_body,
        )
    return None


def check_length(content_length: str | None, *, framed: bool, max_body: int) -> int | None:
    """The body's declared length (None when the server frames it), refusing what cannot be
    accepted before a byte is read."""
    if content_length:
        try:
            length = int(content_length)
        except ValueError:
            raise LengthRequired("invalid Content-Length") from None
        if length < 0:
            raise LengthRequired("invalid Content-Length")
        if length > max_body:
            raise UploadTooLarge(f"upload larger than {max_body} bytes")
        return length
    if framed:
        return None
    raise LengthRequired("a Content-Length is required for uploads")


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer, for the adapters to send as they send anything."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def refusal(exc: QProxyError) -> Answer:
    """The answer to a refused upload: the error's status and its one-line reason."""
    body = (exc.reason + "\n").encode()
    # No Connection header: it is hop-by-hop, which PEP 3333 forbids a WSGI app to send
    # (waitress turns such an answer into a 500). The adapters read the rest of the body
    # before answering instead (see drain_budget), so the connection stays usable.
    headers: tuple[tuple[str, str], ...] = (
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
    )
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers += (("Retry-After", str(retry_after)),)
    return Answer(exc.status, headers, body)


def drain_budget(*, declared: int | None, received: int, max_body: int) -> int:
    """How many more body bytes to read and throw away before sending a refusal.

    A server that answers and closes while nginx is still sending the body makes nginx
    log a broken pipe and give the client a 502 instead of the refusal; reading the rest
    first (never past the upload limit) lets the 4xx through every time.
    """
    if declared is not None and declared > max_body:
        return 0  # refused by its length: not a byte of it is wanted
    ceiling = max_body if declared is None else declared
    return max(0, ceiling - received)


def should_commit(status: int) -> bool:
    """The app accepted the request: keep its files."""
    return status < 400


Outcome = Literal["commit", "discard"]


class Uploads(list[StoredFile]):
    """``qproxy.uploads``: the request's files. Reading them tells :class:`Settle` the app
    looked at them."""

    def __init__(self, files: list[StoredFile], settle: Settle) -> None:
        super().__init__(files)
        self._settle = settle

    def __iter__(self) -> Iterator[StoredFile]:
        self._settle.looked_at()
        return super().__iter__()

    def __len__(self) -> int:
        self._settle.looked_at()
        return super().__len__()

    def __getitem__(self, index: Any) -> Any:
        self._settle.looked_at()
        return super().__getitem__(index)


class Settle:
    """The commit rule as a state machine: fed what the app does, it says once whether the
    request's files are committed or discarded.

    Files are kept only when the app looked at them (read the body, or asked for
    ``qproxy.uploads``) and answered < 400: a route that never reads its body (a login wall
    answering 302) keeps nothing, so strangers cannot fill the disk and the bucket through it.

    Each method returns the outcome to carry out now, or None (nothing to do yet, or
    already decided). Decided no later than the first byte of the answer: a client that
    sees a 2xx can rely on its files being committed.
    """

    def __init__(self) -> None:
        self.status: int | None = None
        self.outcome: Outcome | None = None
        self.looked = False

    def looked_at(self) -> None:
        """The app read the body or the uploads."""
        self.looked = True

    def started(self, status: int) -> None:
        """The app set its status (WSGI's start_response may set it again, with exc_info,
        until the first byte is sent)."""
        self.status = status

    def sending(self) -> Outcome | None:
        """The answer is about to leave."""
        if self.outcome is not None or self.status is None:
            return None
        return self._decide("commit" if self._accepted(self.status) else "discard")

    def failed(self) -> Outcome | None:
        """The app raised: whatever it meant to answer, the client does not see it."""
        return None if self.outcome is not None else self._decide("discard")

    def finished(self) -> Outcome | None:
        """The exchange is over; an app that never set a status accepted nothing."""
        if self.outcome is not None:
            return None
        ok = self.status is not None and self._accepted(self.status)
        return self._decide("commit" if ok else "discard")

    def _accepted(self, status: int) -> bool:
        return self.looked and should_commit(status)

    def _decide(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        return outcome
