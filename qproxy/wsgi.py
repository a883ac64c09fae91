"""WSGI middleware: ``app = UploadMiddleware(app)``.

A thin driver around :class:`qproxy.node.Intake`: read the body, feed it, call the app with
the rewritten form, then commit the files if the app answered < 400, else discard them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING

from qproxy.config import Config
from qproxy.errors import IncompleteBody, QProxyError
from qproxy.intercept import KEY_HEADER, check_length, error_response, should_commit
from qproxy.node import Feeder, Intake, Node

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("qproxy")

READ_SIZE = 1024 * 1024
KEY_ENVIRON = "HTTP_" + KEY_HEADER.upper().replace("-", "_")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _refuse(exc: QProxyError, start_response: StartResponse) -> list[bytes]:
    status, headers, body = error_response(exc)
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]


class UploadMiddleware:
    """Streams uploads (multipart file parts, raw bodies) to the local store."""

    def __init__(
        self, app: WSGIApplication, config: Config | None = None, *, node: Node | None = None
    ) -> None:
        self.app = app
        self.node = node or Node(config)
        self.config = self.node.config

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Only qproxy may tell the app a key: never pass a client's own X-QProxy-Key on.
        environ.pop(KEY_ENVIRON, None)
        # nginx's offload headers (nginx-config --offload) are for qproxy, not the app.
        body_file = environ.pop("HTTP_X_QPROXY_BODY_FILE", None)
        body_token = environ.pop("HTTP_X_QPROXY_BODY_TOKEN", None)
        try:
            intake = self.node.intake(
                method=environ.get("REQUEST_METHOD", "GET"),
                path=environ.get("PATH_INFO", ""),
                content_type=environ.get("CONTENT_TYPE"),
                content_disposition=environ.get("HTTP_CONTENT_DISPOSITION"),
                body_file=body_file,
                body_token=body_token,
            )
        except QProxyError as exc:
            return _refuse(exc, start_response)
        if intake is None:
            return self.app(environ, start_response)

        try:
            if not intake.offloaded:
                self._read_body(environ, intake)
        except QProxyError as exc:
            intake.discard()
            log.info("qproxy: upload refused (%s): %s", exc.status, exc.reason)
            return _refuse(exc, start_response)
        except BaseException:
            intake.discard()
            raise

        body = intake.body()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        environ["qproxy.uploads"] = intake.files
        if intake.raw_key is not None:
            environ[KEY_ENVIRON] = intake.raw_key
        return _Settle(self.app, environ, start_response, intake)

    def _read_body(self, environ: WSGIEnvironment, intake: Intake) -> None:
        stream = environ["wsgi.input"]
        remaining = check_length(
            environ.get("CONTENT_LENGTH"),
            chunked=bool(environ.get("wsgi.input_terminated")),
            max_body=self.config.max_upload_bytes,
        )
        with Feeder(intake) as feeder:
            while remaining is None or remaining > 0:
                want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
                chunk = stream.read(want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                feeder.put(chunk)
            if remaining:
                # A server hands over what arrived before the client went away; a raw
                # body cut short must not be kept as if it were whole.
                declared = int(environ["CONTENT_LENGTH"])
                raise IncompleteBody(
                    f"request body ended after {declared - remaining} of {declared} bytes"
                )
            feeder.put(b"")


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
        # Settled before the first byte of the response leaves: a client that sees a 2xx
        # can rely on its files being committed.
        if self.status is None:
            return
        if should_commit(self.status):
            self.intake.commit()
        else:
            self.intake.discard()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.result:
                self._settle_if_known()
                yield chunk
        except BaseException:
            if self.status is None or not should_commit(self.status):
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
            if self.status is not None and should_commit(self.status):
                self.intake.commit()
            else:
                self.intake.discard()
