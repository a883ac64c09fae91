"""WSGI middleware: ``app = UploadMiddleware(app)``.

A thin driver around :class:`qproxy.node.Intake`: read the body, feed it, call the app with
the rewritten form, then commit the files if the app answered < 400, else discard them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from qproxy.config import Config
from qproxy.errors import LengthRequired, QProxyError, UploadTooLarge
from qproxy.intercept import multipart_boundary
from qproxy.node import Intake, Node

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("qproxy")

READ_SIZE = 256 * 1024
_UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def error_response(exc: QProxyError, start_response: StartResponse) -> list[bytes]:
    from http import HTTPStatus

    body = (exc.reason + "\n").encode()
    start_response(
        f"{exc.status} {HTTPStatus(exc.status).phrase}",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            # The rest of the body may be unread: don't let the client reuse the connection.
            ("Connection", "close"),
        ],
    )
    return [body]


class UploadMiddleware:
    """Streams file parts of multipart/form-data requests to the local store."""

    def __init__(
        self, app: WSGIApplication, config: Config | None = None, *, node: Node | None = None
    ) -> None:
        self.app = app
        self.node = node or Node(config)
        self.config = self.node.config

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in _UPLOAD_METHODS:
            return self.app(environ, start_response)
        try:
            boundary = multipart_boundary(environ.get("CONTENT_TYPE"))
        except QProxyError as exc:
            return error_response(exc, start_response)
        if boundary is None:
            return self.app(environ, start_response)

        intake = self.node.intake(boundary)
        try:
            self._read_body(environ, intake)
        except QProxyError as exc:
            intake.discard()
            log.info("qproxy: upload refused (%s): %s", exc.status, exc.reason)
            return error_response(exc, start_response)
        except BaseException:
            intake.discard()
            raise

        body = intake.body()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        environ["qproxy.uploads"] = intake.files
        return _Settle(self.app, environ, start_response, intake)

    def _read_body(self, environ: WSGIEnvironment, intake: Intake) -> None:
        stream = environ["wsgi.input"]
        length_header = environ.get("CONTENT_LENGTH") or ""
        if length_header:
            try:
                remaining: int | None = int(length_header)
            except ValueError:
                raise LengthRequired("invalid Content-Length") from None
            if remaining is None or remaining < 0:
                raise LengthRequired("invalid Content-Length")
            if remaining > self.config.max_upload_bytes:
                raise UploadTooLarge(f"upload larger than {self.config.max_upload_bytes} bytes")
        elif environ.get("wsgi.input_terminated"):
            remaining = None  # chunked: the server ends the stream
        else:
            raise LengthRequired("a Content-Length is required for uploads")
        while remaining is None or remaining > 0:
            want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            chunk = stream.read(want)
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            intake.feed(chunk)
        intake.feed(b"")


class _Settle:
    """Calls the app and decides, from its status, whether the files are kept."""

    def __init__(
        self,
        app: WSGIApplication,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        intake: Intake,
    ) -> None:
        self.intake = intake
        self.status: int | None = None
        self._start_response = start_response
        try:
            self.result: Iterable[bytes] = app(environ, self._intercept)
        except BaseException:
            intake.discard()
            raise
        self._settle_if_known()

    def _intercept(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        try:
            self.status = int(status.split(" ", 1)[0])
        except ValueError:
            self.status = 500
        return self._start_response(status, headers, exc_info)

    def _settle_if_known(self) -> None:
        if self.status is None:
            return
        if self.status < 400:
            self.intake.commit()
        else:
            self.intake.discard()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.result:
                self._settle_if_known()
                yield chunk
        except BaseException:
            if self.status is None or self.status >= 400:
                self.intake.discard()
            raise
        self._settle_if_known()
        if self.status is None:
            self.intake.discard()

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if self.status is not None and self.status < 400:
                self.intake.commit()
            else:
                self.intake.discard()
