"""WSGI middleware: ``app = UploadMiddleware(app)``.

A thin driver: read the request's headers into an :class:`UploadRequest`, feed the body to
the :class:`Intake`, call the app with the rewritten form, and tell the core's
:class:`Settle` what the app answers; it decides whether the files are kept.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Any

from qproxy.compose import Stores
from qproxy.config import Config
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

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("qproxy")

# gunicorn reads up to 1 MiB per recv and copies the rest of its buffer on every smaller
# read: 1 MiB reads measured ~390 -> ~650 MiB/s.
READ_SIZE = 1024 * 1024
KEY_ENVIRON = "HTTP_" + KEY_HEADER.upper().replace("-", "_")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _send(answer: Answer, start_response: StartResponse) -> list[bytes]:
    status = f"{answer.status} {HTTPStatus(answer.status).phrase}"
    start_response(status, list(answer.headers))
    return [answer.body]


class UploadMiddleware:
    """Streams uploads (multipart file parts, raw bodies) to the local store."""

    def __init__(
        self, app: WSGIApplication, config: Config | None = None, *, stores: Stores | None = None
    ) -> None:
        self.app = app
        self.stores = stores or Stores(config)
        self.config = self.stores.config

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Only qproxy may tell the app a key: never pass a client's own X-QProxy-Key on.
        environ.pop(KEY_ENVIRON, None)
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
