"""Sans-IO body rewriting: a multipart/form-data body, or a raw body stored whole.

Bytes go in through :meth:`MultipartRewriter.feed`; out come events telling the caller
which bytes belong to which file (``FileStart``, ``FileData``, ``FileEnd``) and, at the end,
the form the app should see, in which each file part has become a text field holding the
file's key. No sockets, files, Redis or S3 here: the WSGI and ASGI adapters do the I/O.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio import multipart as mp

from qproxy.errors import MalformedUpload, UploadTooLarge
from qproxy.keys import generate_key

MAX_HEADER_BYTES = 16 * 1024
MAX_FILENAME_CHARS = 255
_CONTENT_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Python's own table only: the module-level functions read the machine's mime.types files
# (I/O, and a type that differs from one machine to the next).
_TYPES = mimetypes.MimeTypes()
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


@dataclass(frozen=True, slots=True)
class FileStart:
    """A file part begins; store what follows under ``key``."""

    field: str
    key: str
    filename: str
    content_type: str


@dataclass(frozen=True, slots=True)
class FileData:
    data: bytes


@dataclass(frozen=True, slots=True)
class FileEnd:
    """The file part is complete. ``keep`` is False for the empty part a browser sends for
    a file input left blank (no name, no bytes): nothing to store."""

    keep: bool


Event = FileStart | FileData | FileEnd


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary if ``content_type`` is multipart/form-data, else None.

    Raises :class:`MalformedUpload` for multipart/form-data without a usable boundary.
    """
    if not content_type:
        return None
    mimetype, options = parse_options_header(content_type)
    if mimetype != "multipart/form-data":
        return None
    boundary = options.get("boundary", "")
    # RFC 2046 5.1.1: 1-70 characters from a small set, not ending in a space.
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise MalformedUpload("multipart/form-data without a valid boundary")
    return boundary.encode("ascii")


# Characters a name shown to people must not carry: controls (C0, C1), format characters
# (bidi overrides such as U+202E turn "gpj.exe" into "exe.jpg" on screen, zero-width
# joiners, BOMs), line and paragraph separators, surrogates, private use, unassigned.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def clean_filename(raw: str | None) -> str:
    """The client's filename as metadata: no control or invisible characters, bounded."""
    if not raw:
        return ""
    # Some old browsers send the client's full path.
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    shown = "".join(c for c in name if unicodedata.category(c) not in _INVISIBLE)
    return shown[:MAX_FILENAME_CHARS]


def clean_content_type(raw: str | None, filename: str) -> str:
    """A safe Content-Type for a stored file (no parameters, no header injection)."""
    mimetype = (raw or "").split(";", 1)[0].strip().lower()
    if mimetype and mimetype != "application/octet-stream" and _CONTENT_TYPE_RE.fullmatch(mimetype):
        return mimetype
    guessed, _ = _TYPES.guess_type(filename or "", strict=False)
    if guessed and _CONTENT_TYPE_RE.fullmatch(guessed):
        return guessed
    return "application/octet-stream"


def _quote_name(name: str) -> bytes:
    # HTML's multipart/form-data encoding: percent-escape the three characters that would
    # break the quoted name.
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode()


class _Decoder(mp.MultipartDecoder):
    """werkzeug's decoder with a safer hold-back of a possibly split boundary.

    This overrides a private method and reads the decoder's ``buffer``, so werkzeug is
    pinned to the minor release tested byte by byte (tests/core/test_multipart.py).

    werkzeug (3.1.x) decides how much of the buffer's tail might be the start of the next
    ``CRLF--boundary`` by the positions of the last CR and LF only; when a chunk ends a few
    bytes into the marker (``"\\r\\n--bound"``) it releases the CR as file data, and the
    stored file gains a stray byte. Chunk edges fall anywhere on a real network, so hold
    back exactly the tail that is a prefix of a delimiter (or starts with a whole one).
    """

    def _last_partial_boundary_index(self, data: bytes | bytearray) -> int:
        delimiters = (b"\r\n--" + self.boundary, b"\n--" + self.boundary, b"\r--" + self.boundary)
        longest = len(delimiters[0])
        # A whole delimiter may sit in the tail, waiting for its "--" or line break.
        for i in range(max(0, len(data) - longest - 64), len(data)):
            if data[i] not in (10, 13):
                continue
            tail = bytes(data[i:])
            if any(d.startswith(tail) or tail.startswith(d) for d in delimiters):
                return i
        return len(data)


class MultipartRewriter:
    """Turns one multipart body into file events plus the rewritten form."""

    def __init__(
        self,
        boundary: bytes,
        *,
        max_body: int,
        max_parts: int,
        max_form_memory: int,
        make_key: Callable[[str | None], str] = generate_key,
    ) -> None:
        self.boundary = boundary
        self.max_body = max_body
        self.max_parts = max_parts
        self.max_form_memory = max_form_memory
        self.make_key = make_key
        self.received = 0
        self._decoder = _Decoder(boundary, max_parts=max_parts)
        self._body = bytearray()
        self._form_bytes = 0
        self._part: mp.Field | mp.File | None = None
        self._file: FileStart | None = None
        self._file_size = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[Event]:
        """Give the next bytes of the body; ``b""`` marks its end."""
        if self._done:
            if data:
                raise MalformedUpload("data after the end of the multipart body")
            return []
        self.received += len(data)
        if self.received > self.max_body:
            raise UploadTooLarge(f"upload larger than {self.max_body} bytes")
        events: list[Event] = []
        if data and self._file is not None and self._decoder.state == mp.State.DATA:
            data = self._file_data(data, events)
            if not data:
                return events
        try:
            self._decoder.receive_data(data if data else None)
            self._drain(events)
        except RequestEntityTooLarge as exc:
            raise UploadTooLarge(f"more than {self.max_parts} parts in the form") from exc
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise MalformedUpload(f"malformed multipart body: {exc}") from exc
        if (
            self._decoder.state in (mp.State.PREAMBLE, mp.State.PART)
            and len(self._decoder.buffer) > MAX_HEADER_BYTES
        ):
            raise MalformedUpload("multipart part headers too long or boundary missing")
        if not data and not self._done:
            raise MalformedUpload("multipart body ends before its closing boundary")
        return events

    def _file_data(self, data: bytes, events: list[Event]) -> bytes:
        """The fast path through a file's bytes: a chunk with no ``--boundary`` in it is file
        data but for a tail that may begin the next delimiter, which the decoder keeps.

        Returns what the decoder must still see (all of ``data`` when the chunk holds a
        boundary, or the decoder holds bytes from before). werkzeug's decoder copies its
        buffer three or four times per chunk; here a chunk costs one search.
        """
        decoder = self._decoder
        if decoder.buffer or (b"--" + self.boundary) in data:
            return data
        cut = decoder._last_partial_boundary_index(data)
        if cut:
            chunk = data if cut == len(data) else data[:cut]
            self._file_size += len(chunk)
            events.append(FileData(chunk))
        decoder.buffer.extend(data[cut:])
        return b""

    def body(self) -> bytes:
        """The form the app sees (valid once the closing boundary was fed)."""
        assert self._done, "body() before the end of the multipart body"
        return bytes(self._body)

    def _drain(self, events: list[Event]) -> None:
        decoder = self._decoder
        while not self._done:
            event = decoder.next_event()
            if event is mp.NEED_DATA:
                return
            if isinstance(event, mp.File):
                self._start_file(event, events)
            elif isinstance(event, mp.Field):
                self._start_field(event)
            elif isinstance(event, mp.Data):
                self._data(event, events)
            elif isinstance(event, mp.Epilogue):
                self._body += b"--" + self.boundary + b"--\r\n"
                self._done = True

    @staticmethod
    def _check_headers(event: mp.Field | mp.File) -> None:
        # By the bytes, not by what arrived in one feed: the buffer check in feed() only
        # sees part headers that straddle a feed, and a whole 90 kB block fed at once went
        # through (a limit that depended on the server's chunking).
        size = sum(len(k) + len(v) + 4 for k, v in event.headers.items())
        if size > MAX_HEADER_BYTES:
            raise MalformedUpload("multipart part headers too long")
        for name in ("content-disposition", "content-type"):
            # The framework behind qproxy could read the other one.
            if len(event.headers.getlist(name)) > 1:
                raise MalformedUpload(f"form part with more than one {name.title()} header")

    def _start_field(self, event: mp.Field) -> None:
        self._check_headers(event)
        if event.name is None:
            raise MalformedUpload("form part without a name")
        self._part = event
        head = b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n' % (
            self.boundary,
            _quote_name(event.name),
        )
        content_type = event.headers.get("content-type")
        if content_type and not _CONTROL_RE.search(content_type):
            head += b"Content-Type: %s\r\n" % content_type.encode("latin-1", "replace")
        self._add_form(head + b"\r\n")

    def _start_file(self, event: mp.File, events: list[Event]) -> None:
        self._check_headers(event)
        if event.name is None:
            raise MalformedUpload("file part without a name")
        self._part = event
        filename = clean_filename(event.filename)
        start = FileStart(
            field=event.name,
            key=self.make_key(filename),
            filename=filename,
            content_type=clean_content_type(event.headers.get("content-type"), filename),
        )
        self._file = start
        self._file_size = 0
        events.append(start)

    def _data(self, event: mp.Data, events: list[Event]) -> None:
        part = self._part
        if part is None:
            raise MalformedUpload("data outside a part")
        if self._file is not None:
            if event.data:
                self._file_size += len(event.data)
                events.append(FileData(event.data))
            if not event.more_data:
                keep = bool(self._file.filename) or self._file_size > 0
                events.append(FileEnd(keep=keep))
                value = self._file.key.encode() if keep else b""
                head = b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n' % (
                    self.boundary,
                    _quote_name(self._file.field),
                )
                self._add_form(head + value + b"\r\n")
                self._file = None
                self._part = None
        else:
            self._add_form(event.data)
            if not event.more_data:
                self._add_form(b"\r\n")
                self._part = None

    def _add_form(self, data: bytes) -> None:
        self._form_bytes += len(data)
        if self._form_bytes > self.max_form_memory:
            raise UploadTooLarge(f"form fields larger than {self.max_form_memory} bytes")
        self._body += data


class RawBodyRewriter:
    """A non-multipart body stored whole as one file; the app then sees an empty body."""

    def __init__(
        self,
        *,
        field: str,
        filename: str,
        content_type: str,
        max_body: int,
        make_key: Callable[[str | None], str] = generate_key,
    ) -> None:
        self.max_body = max_body
        self.received = 0
        self.start = FileStart(
            field=field,
            key=make_key(filename),
            filename=filename,
            content_type=clean_content_type(content_type, filename),
        )
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def key(self) -> str:
        return self.start.key

    def feed(self, data: bytes) -> list[Event]:
        if self._done:
            if data:
                raise MalformedUpload("data after the end of the body")
            return []
        self.received += len(data)
        if self.received > self.max_body:
            raise UploadTooLarge(f"upload larger than {self.max_body} bytes")
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(self.start)
        if data:
            events.append(FileData(data))
        else:
            events.append(FileEnd(keep=True))
            self._done = True
        return events

    def finish(self) -> None:
        """The body was stored without passing through here (offload mode)."""
        self._started = self._done = True

    def body(self) -> bytes:
        return b""


Rewriter = MultipartRewriter | RawBodyRewriter
