"""The apps the benchmarks run: each candidate and the baseline it is measured against."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from werkzeug.formparser import parse_form_data

from qproxy.asgi import UploadMiddleware as AsgiUploadMiddleware
from qproxy.wsgi import UploadMiddleware as WsgiUploadMiddleware

SINK = os.environ.get("BENCH_SINK", "/tmp/qproxy-bench-sink")
MiB = 1024 * 1024


def _form_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """What a typical app does with an upload once qproxy has stored it: read the form."""
    from werkzeug.wrappers import Request as WRequest

    request = WRequest(environ)
    stored = [u.key for u in environ.get("qproxy.uploads", [])]  # (a tus upload's too)
    body = json.dumps({"keys": request.form.getlist("file") or stored}).encode()
    start_response("201 Created", [("Content-Type", "application/json")])
    return [body]


def wsgi_qproxy() -> Any:
    return WsgiUploadMiddleware(_form_app)


def wsgi_werkzeug(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The baseline: the app parses the upload itself (werkzeug spools files to disk)."""
    _, _, files = parse_form_data(environ)
    os.makedirs(SINK, exist_ok=True)
    for storage in files.values():
        target = os.path.join(SINK, os.urandom(8).hex())
        with open(target, "wb") as out:
            shutil.copyfileobj(storage.stream, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.unlink(target)
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b"{}"]


def wsgi_werkzeug_app() -> Any:
    """:func:`wsgi_werkzeug` for servers that want a factory."""
    return wsgi_werkzeug


def wsgi_s3_inline(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The old way: the request uploads the file to S3 before it answers."""
    import boto3

    _, _, files = parse_form_data(environ)
    client = boto3.client(
        "s3", endpoint_url=os.environ["QPROXY_S3_ENDPOINT_URL"], region_name="us-east-1"
    )
    for storage in files.values():
        client.upload_fileobj(
            storage.stream, os.environ["QPROXY_S3_BUCKET"], "inline/" + os.urandom(8).hex()
        )
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b"{}"]


def wsgi_fsync_body(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Baseline for offload mode: nginx wrote the body; make it durable, nothing else."""
    path = environ.get("HTTP_X_QPROXY_BODY_FILE")
    if path:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b"{}"]


def wsgi_durable_copy(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The floor for an app that keeps an upload safely: the raw body read, written to a
    file and fsynced (no parsing, no hash), then thrown away."""
    stream = environ["wsgi.input"]
    os.makedirs(SINK, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=SINK)
    try:
        while chunk := stream.read(MiB):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    start_response("201 Created", [("Content-Type", "application/json")])
    return [b"{}"]


def wsgi_durable_copy_app() -> Any:
    """:func:`wsgi_durable_copy` for servers that want a factory."""
    return wsgi_durable_copy


def wsgi_s3_inline_app() -> Any:
    """:func:`wsgi_s3_inline` for servers that want a factory."""
    return wsgi_s3_inline


async def _starlette_upload(request: Request) -> Response:
    form = await request.form()
    return JSONResponse({"keys": [str(v) for v in form.getlist("file")]}, status_code=201)


async def _starlette_parse(request: Request) -> Response:
    """The baseline: Starlette parses the upload itself (python-multipart, spooled files)."""
    form = await request.form()
    for value in form.getlist("file"):
        upload: Any = value
        os.makedirs(SINK, exist_ok=True)
        target = os.path.join(SINK, os.urandom(8).hex())
        with open(target, "wb") as out:
            while chunk := await upload.read(1024 * 1024):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.unlink(target)
    await form.close()
    return JSONResponse({}, status_code=201)


async def _starlette_s3_inline(request: Request) -> Response:
    """The old way, ASGI: the request uploads the file to S3 (in a thread) before it answers."""
    import anyio.to_thread
    import boto3

    form = await request.form()
    client = boto3.client(
        "s3", endpoint_url=os.environ["QPROXY_S3_ENDPOINT_URL"], region_name="us-east-1"
    )
    for value in form.getlist("file"):
        upload: Any = value
        name = "inline/" + os.urandom(8).hex()
        await anyio.to_thread.run_sync(
            client.upload_fileobj, upload.file, os.environ["QPROXY_S3_BUCKET"], name
        )
    await form.close()
    return JSONResponse({}, status_code=201)


def asgi_s3_inline() -> Any:
    return Starlette(routes=[Route("/upload", _starlette_s3_inline, methods=["POST"])])


def asgi_qproxy() -> Any:
    return AsgiUploadMiddleware(
        Starlette(routes=[Route("/upload", _starlette_upload, methods=["POST"])])
    )


async def _tus_create(request: Request) -> Response:
    return Response(status_code=201)  # QPROXY_TUS_PATH=/files/: every creation welcome


async def _tus_complete(request: Request) -> Response:
    stored = [u.key for u in request.scope.get("qproxy.uploads", [])]
    return Response(status_code=204 if stored else 400)


def asgi_qproxy_tus() -> Any:
    """tus at /files/ (QPROXY_TUS_PATH), the ASGI middleware."""
    return AsgiUploadMiddleware(
        Starlette(
            routes=[
                Route("/files/", _tus_create, methods=["POST"]),
                Route("/files/{upload_id}", _tus_complete, methods=["PATCH"]),
            ]
        )
    )


def asgi_tuspyserver() -> Any:
    """The baseline: tuspyserver (PyPI), a tus server as a FastAPI router, storing on disk."""
    from fastapi import FastAPI
    from tuspyserver import create_tus_router

    app = FastAPI()
    app.include_router(create_tus_router(prefix="files", files_dir=os.path.join(SINK, "tus")))
    return app


def asgi_starlette() -> Any:
    return Starlette(routes=[Route("/upload", _starlette_parse, methods=["POST"])])


async def _asgi_durable_copy(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """:func:`wsgi_durable_copy` for ASGI: the raw body as the server hands it over, written
    to a file and fsynced (no parsing, no hash), then thrown away."""
    if scope["type"] != "http":
        return
    os.makedirs(SINK, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=SINK)
    try:
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            os.write(fd, message.get("body", b""))
            more = message.get("more_body", False)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def asgi_durable_copy() -> Any:
    return _asgi_durable_copy


async def _bare_resolve(request: Request) -> Response:
    # What the resolver answers for a local file, without looking anything up.
    key = request.path_params["key"]
    return Response(
        b"",
        headers={
            "X-Accel-Redirect": "/_qp/local/" + key,
            "Content-Type": "application/octet-stream",
        },
    )


async def _bare_redirect(request: Request) -> Response:
    return Response(
        b"",
        status_code=302,
        headers={"Location": "http://127.0.0.1:9/" + request.path_params["key"]},
    )


def bare_resolver() -> Any:
    return Starlette(
        routes=[
            Route("/resolve/{key:path}", _bare_resolve),
            Route("/redirect/{key:path}", _bare_redirect),
            Route("/metrics", _bare_redirect),
        ]
    )
