"""The same small app as WSGI (Flask) and ASGI (Starlette), for the hostile-input suite.

Routes: ``POST /upload`` reads the form and echoes what the framework saw; ``POST /login``
answers 302 without looking at the body (a login wall); ``PUT /files/<name>`` takes a raw
body (QPROXY_RAW_UPLOAD_PATHS=/files/*); ``GET /`` answers ok.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, jsonify, redirect, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from qproxy.asgi import UploadMiddleware as AsgiMiddleware
from qproxy.wsgi import UploadMiddleware as WsgiMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


def _seen(form: dict[str, list[str]], files: list[str], uploads: list[Any]) -> dict[str, Any]:
    return {
        "form": form,
        # Files the framework itself parsed: qproxy should have left none.
        "files": files,
        "uploads": [u.as_dict() for u in uploads],
    }


def wsgi_app() -> WSGIApplication:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "ok"

    @app.post("/upload")
    def upload() -> tuple[object, int]:
        form = {k: request.form.getlist(k) for k in request.form}
        status = int(request.form.get("status", "201"))
        seen = _seen(form, list(request.files), request.environ.get("qproxy.uploads", []))
        return jsonify(seen), status

    @app.post("/login")
    def login() -> object:
        return redirect("/login-page", 302)

    @app.route("/files/<path:name>", methods=["PUT", "POST"])
    def raw(name: str) -> tuple[object, int]:
        request.get_data()
        seen = _seen({}, [], request.environ.get("qproxy.uploads", []))
        return jsonify(seen), 201

    return WsgiMiddleware(app.wsgi_app)


async def _upload(request: Request) -> Response:
    form = await request.form()
    fields = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in form}
    files = [k for k in form if any(not isinstance(v, str) for v in form.getlist(k))]
    status = int(str(form.get("status", "201")))
    seen = _seen(fields, files, request.scope.get("qproxy.uploads", []))
    return JSONResponse(seen, status_code=status)


async def _login(request: Request) -> Response:
    return RedirectResponse("/login-page", status_code=302)


async def _raw(request: Request) -> Response:
    await request.body()
    return JSONResponse(_seen({}, [], request.scope.get("qproxy.uploads", [])), status_code=201)


async def _index(request: Request) -> Response:
    return PlainTextResponse("ok")


def asgi_app() -> ASGIApp:
    app = Starlette(
        routes=[
            Route("/", _index),
            Route("/upload", _upload, methods=["POST"]),
            Route("/login", _login, methods=["POST"]),
            Route("/files/{name:path}", _raw, methods=["PUT", "POST"]),
        ]
    )
    return AsgiMiddleware(app)
