"""ASGI apps the tests run under real uvicorn, wrapped in qproxy's ASGI middleware."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Form
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from qproxy.asgi import UploadMiddleware

LIFESPAN = {"started": False}


async def upload(request: Request) -> Response:
    form = await request.form()
    uploads = request.scope.get("qproxy.uploads", [])
    status = int(str(form.get("status", "201")))
    return JSONResponse(
        {
            "keys": [str(v) for v in form.getlist("file")],
            "form": {k: [str(v) for v in form.getlist(k)] for k in form},
            "uploads": [u.as_dict() for u in uploads],
        },
        status_code=status,
    )


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def lifespan_ran(request: Request) -> Response:
    return PlainTextResponse(str(LIFESPAN["started"]))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    LIFESPAN["started"] = True
    yield


async def tus_create(request: Request) -> Response:
    # QPROXY_TUS_PATH=/tus/: the app decides each creation.
    info = request.scope.get("qproxy.tus", {})
    if info.get("metadata", {}).get("filename") == "refused.bin":
        return PlainTextResponse("not for you\n", status_code=403)
    return Response(status_code=201)


async def tus_complete(request: Request) -> Response:
    # The request that completes an upload: a raw-body upload, as any other.
    if request.scope["qproxy.tus"]["metadata"].get("filename") == "ignored.bin":
        return Response(status_code=204)  # a 2xx that never looked at the upload
    keys = [u.key for u in request.scope.get("qproxy.uploads", [])]
    if request.scope["qproxy.tus"]["metadata"].get("filename") == "refused-at-end.bin":
        return PlainTextResponse("no thanks\n", status_code=422)
    log = os.environ.get("QP_TUS_LOG")
    if log:
        with open(log, "a") as fh:
            upload_id = request.path_params["upload_id"]
            fh.write(json.dumps({"upload": upload_id, "keys": keys}) + "\n")
    return Response(status_code=204)


def starlette_app() -> ASGIApp:
    app = Starlette(
        routes=[
            Route("/tus/", tus_create, methods=["POST"]),
            Route("/tus/{upload_id}", tus_complete, methods=["PATCH", "POST"]),
            Route("/upload", upload, methods=["POST"]),
            Route("/ping", ping),
            Route("/", ping),
            Route("/lifespan", lifespan_ran),
        ],
        lifespan=lifespan,
    )
    return UploadMiddleware(app)


def fastapi_app() -> ASGIApp:
    app = FastAPI()

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/upload", status_code=201)
    async def upload_files(
        request: FastAPIRequest,
        file: Annotated[list[str], Form()],
        title: Annotated[str, Form()] = "",
    ) -> dict[str, object]:
        uploads = request.scope.get("qproxy.uploads", [])
        return {"keys": file, "title": title, "uploads": [u.as_dict() for u in uploads]}

    return UploadMiddleware(app)
