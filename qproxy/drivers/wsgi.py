"""WSGI middleware: ``app = UploadMiddleware(app)``.

A thin driver: read the request's headers into an :class:`UploadRequest`, feed the body to
the :class:`Intake`, call the app with the rewritten form, and tell the core's
:class:`Settle` what the app answers; it decides whether the files are kept.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any

from qproxy import logs, metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core import tus as tus_core
from qproxy.core.upload import (
    KEY_HEADER,
    Answer,
    Settle,
    UploadRequest,
    Uploads,
    drain_budget,
    refusal,
)
from qproxy.errors import IncompleteBody, QProxyError
from qproxy.lifecycle.ingest import Feeder, Intake, begin
from qproxy.lifecycle.tus import Tus

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("qproxy")

# gunicorn reads up to 1 MiB per recv and copies the rest of its buffer on every smaller
# read: 1 MiB reads measured ~390 -> ~650 MiB/s.
READ_SIZE = 1024 * 1024
KEY_ENVIRON = "HTTP_" + KEY_HEADER.upper().replace("-", "_")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _send(answer: Answer, start_response: StartResponse) -> list[bytes]:
    start_response(_status_line(answer.status), list(answer.headers))
    return [answer.body]


class UploadMiddleware:
    """Streams uploads (multipart file parts, raw bodies) to the local store."""

    def __init__(
        self, app: WSGIApplication, config: Config | None = None, *, stores: Stores | None = None
    ) -> None:
        self.app = app
        self.stores = stores or Stores(config)
        self.config = self.stores.config
        metrics.setup(self.config)
        if self.config.log_format == "json":  # (otherwise the app's logging is the app's)
            logs.setup(self.config, whole_process=False)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Only qproxy may tell the app a key: never pass a client's own X-QProxy-Key on.
        environ.pop(KEY_ENVIRON, None)
        environ.pop("qproxy.tus", None)
        tus_path = self.config.tus_path
        path = environ.get("PATH_INFO", "")
        if tus_path and (path.startswith(tus_path) or path + "/" == tus_path):
            return self._tus(environ, start_response, path[len(tus_path) :])
        # nginx's offload headers (nginx-config --offload) are for qproxy, not the app.
        request = UploadRequest(
            method=environ.get("REQUEST_METHOD", "GET"),
            path=environ.get("PATH_INFO", ""),
            content_type=environ.get("CONTENT_TYPE"),
            content_disposition=environ.get("HTTP_CONTENT_DISPOSITION"),
            content_length=environ.get("CONTENT_LENGTH"),
            framed=bool(environ.get("wsgi.input_terminated")),
            body_file=environ.pop("HTTP_X_QPROXY_BODY_FILE", None),
            body_token=environ.pop("HTTP_X_QPROXY_BODY_TOKEN", None),
        )
        stream = environ["wsgi.input"]
        max_body = self.config.max_upload_bytes
        try:
            intake = begin(self.stores, request)
        except QProxyError as exc:
            declared = _length(request)
            # Without a length or a framing server there is no body to read (PEP 3333).
            if declared is not None or request.framed:
                budget = drain_budget(declared=declared, received=0, max_body=max_body)
                _drain(stream, budget)
            return _send(refusal(exc), start_response)
        if intake is None:
            return self.app(environ, start_response)

        reader = _BodyReader(stream)
        try:
            if not intake.offloaded:
                reader.feed(intake)
        except QProxyError as exc:
            intake.discard()
            log.info("qproxy: upload refused (%s): %s", exc.status, exc.reason)
            if not isinstance(exc, IncompleteBody):
                declared = intake.plan.length
                _drain(
                    stream,
                    drain_budget(declared=declared, received=reader.received, max_body=max_body),
                )
            return _send(refusal(exc), start_response)
        except BaseException:
            intake.discard()
            raise

        settle = Settle()
        body = intake.body()
        environ["wsgi.input"] = _Body(body, settle)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        environ["qproxy.uploads"] = Uploads(intake.files, settle)
        if intake.raw_key is not None:
            environ[KEY_ENVIRON] = intake.raw_key
        return _Response(self.app, environ, start_response, intake, settle)

    # -- tus: resumable uploads ------------------------------------------------------------

    @functools.cached_property
    def tus(self) -> Tus:
        return Tus(self.stores)

    def _tus(
        self, environ: WSGIEnvironment, start_response: StartResponse, rest: str
    ) -> Iterable[bytes]:
        headers = {
            name[5:].replace("_", "-").lower(): value
            for name, value in environ.items()
            if name.startswith("HTTP_")
        }
        for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(name):
                headers[name.replace("_", "-").lower()] = environ[name]
        body = _TusBody(environ["wsgi.input"], _length_of(headers))
        method = environ.get("REQUEST_METHOD", "GET")
        cors = tus_core.cors_headers(headers.get("origin"), self.config.tus_origins)
        if cors:  # every answer, the app's own refusals too, readable by the browser
            start_response = _adding(start_response, cors)
        try:
            call = tus_core.parse(method, rest, headers, max_size=self.tus.max_size)
            if call.kind == "options":
                return _send(tus_core.options_answer(max_size=self.tus.max_size), start_response)
            if call.kind == "head":
                upload = self.tus.parts_shown(self.tus.get(call.upload_id))
                return _send(tus_core.head_answer(upload), start_response)
            if call.kind == "delete":
                self.tus.terminate(call.upload_id)
                return _send(tus_core.terminated_answer(), start_response)
            if call.kind == "create":
                return self._tus_create(environ, start_response, call, body)
            upload = self.tus.get(call.upload_id)
            upload = self.tus.append(upload, call, body.chunks())
            if upload.complete and not upload.is_partial:
                refused = self._tus_complete(environ, start_response, upload)
                if refused is not None:
                    return refused
            return _send(tus_core.patched_answer(upload), start_response)
        except tus_core.TusRefusal as refusal_:
            body.drain(self.tus.max_size)
            return _send(refusal_.answer(), start_response)

    def _tus_create(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        call: tus_core.TusCall,
        body: _TusBody,
    ) -> Iterable[bytes]:
        # The app decides: it sees the creation (its length and metadata), with no body.
        asked = {**environ}
        asked["qproxy.tus"] = {
            "length": call.length,
            "metadata": tus_core.parse_metadata(call.metadata),
        }
        asked["wsgi.input"] = io.BytesIO(b"")
        asked["CONTENT_LENGTH"] = "0"
        status, app_headers, answer = _ask(self.app, asked, None)
        if status >= 400:
            body.drain(self.tus.max_size)
            start_response(_status_line(status), app_headers)
            return [answer]
        make = self.tus.create_final if call.concat == "final" else self.tus.create
        upload = make(call)
        location = self.tus.location(upload.upload_id)
        if call.body_length:
            upload = self.tus.append(upload, call, body.chunks())
        if upload.complete and not upload.is_partial:
            refused = self._tus_complete(environ, start_response, upload)
            if refused is not None:
                return refused
        created = tus_core.created_answer(location, upload, with_body=bool(call.body_length))
        return _send(created, start_response)

    def _tus_complete(
        self, environ: WSGIEnvironment, start_response: StartResponse, upload: tus_core.Upload
    ) -> Iterable[bytes] | None:
        """The last byte is in: the app gets it as a raw-body upload (empty body, the key,
        ``qproxy.uploads``) and its answer decides the commit. None: accepted."""
        intake = self.tus.finish(upload)
        settle = Settle()
        asked = {**environ}
        # Always as PATCH of the upload's own URL (also when a POST brought the last byte:
        # creation-with-upload, concatenation), so the app has one route for it.
        asked["REQUEST_METHOD"] = "PATCH"
        asked["PATH_INFO"] = self.tus.location(upload.upload_id)
        asked["QUERY_STRING"] = ""
        asked["wsgi.input"] = _Body(b"", settle)
        asked["CONTENT_LENGTH"] = "0"
        asked["qproxy.uploads"] = Uploads(intake.files, settle)
        asked["qproxy.tus"] = {
            "length": upload.length,
            "metadata": tus_core.parse_metadata(upload.metadata),
        }
        assert intake.raw_key is not None
        asked[KEY_ENVIRON] = intake.raw_key
        try:
            status, app_headers, body = _ask(self.app, asked, settle)
        except BaseException:
            intake.settle(settle.failed())
            raise
        intake.settle(settle.finished())
        if settle.outcome == "commit":
            return None
        if status < 400:
            return _send(self.tus.not_taken(upload, status), start_response)
        start_response(_status_line(status), app_headers)
        return [body]


def _adding(start_response: StartResponse, extra: tuple[tuple[str, str], ...]) -> StartResponse:
    def start(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        return start_response(status, [*headers, *extra], exc_info)

    return start


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:  # tus's own 460
        return f"{status} {tus_core.PHRASES.get(status, 'Unknown')}"


def _ask(
    app: WSGIApplication, environ: WSGIEnvironment, settle: Settle | None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Run the app to the end and keep its answer (tus sends its own on success)."""
    answer: dict[str, Any] = {"status": 500, "headers": []}
    written: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        try:
            answer["status"] = int(status.split(" ", 1)[0])
        except ValueError:
            answer["status"] = 500
        answer["headers"] = headers
        if settle is not None:
            settle.started(answer["status"])
        return written.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            written.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return answer["status"], answer["headers"], b"".join(written)


class _TusBody:
    """A tus request's body, read once (as chunks, or thrown away before a refusal)."""

    def __init__(self, stream: Any, length: int | None) -> None:
        self.stream = stream
        self.length = length
        self.received = 0

    def chunks(self) -> Iterator[bytes]:
        while self.length is None or self.received < self.length:
            want = READ_SIZE if self.length is None else min(READ_SIZE, self.length - self.received)
            chunk = self.stream.read(want)
            if not chunk:
                return
            self.received += len(chunk)
            yield chunk

    def drain(self, max_size: int) -> None:
        if self.length is not None:
            _drain(self.stream, min(max_size, self.length - self.received))


def _length_of(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _length(request: UploadRequest) -> int | None:
    try:
        return int(request.content_length or "")
    except ValueError:
        return None


def _drain(stream: io.BufferedIOBase, budget: int) -> None:
    """Read and throw away up to ``budget`` bytes of a refused body (see drain_budget)."""
    while budget > 0:
        chunk = stream.read(min(READ_SIZE, budget))
        if not chunk:
            return
        budget -= len(chunk)


class _BodyReader:
    """Reads the body into an intake, counting what it took from the server."""

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self.stream = stream
        self.received = 0

    def feed(self, intake: Intake) -> None:
        declared = intake.plan.length
        remaining = declared
        with Feeder(intake) as feeder:
            while remaining is None or remaining > 0:
                want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
                chunk = self.stream.read(want)
                if not chunk:
                    break
                self.received += len(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
                feeder.put(chunk)
            if remaining:
                # A server hands over what arrived before the client went away; a raw body
                # cut short must not be kept as if it were whole.
                assert declared is not None
                raise IncompleteBody(
                    f"request body ended after {declared - remaining} of {declared} bytes"
                )
            feeder.put(b"")


class _Body(io.BytesIO):
    """The rewritten body the app reads; reading it tells :class:`Settle` the app looked."""

    def __init__(self, body: bytes, settle: Settle) -> None:
        super().__init__(body)
        self._settle = settle

    def read(self, size: int | None = -1) -> bytes:
        self._settle.looked_at()
        return super().read(size)

    def read1(self, size: int | None = -1) -> bytes:
        self._settle.looked_at()
        return super().read1(size)

    def readinto(self, buffer: Any) -> int:
        self._settle.looked_at()
        return super().readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._settle.looked_at()
        return super().readline(size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        self._settle.looked_at()
        return super().readlines(hint)

    def __iter__(self) -> Any:
        self._settle.looked_at()
        return super().__iter__()


class _Response:
    """The app's answer, passed on; the core's :class:`Settle` hears of each step."""

    def __init__(
        self,
        app: WSGIApplication,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        intake: Intake,
        settle: Settle,
    ) -> None:
        self.intake = intake
        self.settle = settle
        self._start_response = start_response
        try:
            self.result: Iterable[bytes] = app(environ, self._intercept)
        except BaseException:
            intake.settle(self.settle.failed())
            raise
        intake.settle(self.settle.sending())

    def _intercept(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        try:
            self.settle.started(int(status.split(" ", 1)[0]))
        except ValueError:
            self.settle.started(500)
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.result:
                self.intake.settle(self.settle.sending())
                yield chunk
        except BaseException:
            self.intake.settle(self.settle.failed())
            raise
        self.intake.settle(self.settle.finished())

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.intake.settle(self.settle.finished())
