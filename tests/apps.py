"""Apps the end-to-end tests run behind qproxy (imported by the stack's app process)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask, jsonify, request

from qproxy.wsgi import UploadMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "ok"

    @app.post("/upload")
    def upload() -> tuple[object, int]:
        uploads = request.environ.get("qproxy.uploads", [])
        status = int(request.form.get("status", "201"))
        return jsonify(
            keys=request.form.getlist("file"),
            form={k: request.form.getlist(k) for k in request.form},
            files=list(request.files),
            uploads=[u.as_dict() for u in uploads],
        ), status

    @app.route("/files/<path:name>", methods=["PUT", "POST"])
    def raw_upload(name: str) -> tuple[object, int]:
        # QPROXY_RAW_UPLOAD_PATHS=/files/*: the body is stored, the key comes in a header.
        uploads = request.environ.get("qproxy.uploads", [])
        return jsonify(
            key=request.headers.get("X-QProxy-Key"),
            body=request.get_data(as_text=True),
            uploads=[u.as_dict() for u in uploads],
            headers=sorted(request.headers.keys()),
        ), int(request.args.get("status", "201"))

    @app.post("/tus/")
    def tus_create() -> tuple[str, int]:
        # QPROXY_TUS_PATH=/tus/: the app decides each creation (quotas, authentication).
        info = request.environ.get("qproxy.tus", {})
        if info.get("metadata", {}).get("filename") == "refused.bin":
            return "not for you\n", 403
        return "", 201

    @app.route("/tus/<upload_id>", methods=["PATCH", "POST"])
    def tus_complete(upload_id: str) -> tuple[str, int]:
        # The request that completes an upload: a raw-body upload, as any other.
        if request.environ["qproxy.tus"]["metadata"].get("filename") == "ignored.bin":
            return "", 204  # a 2xx that never looked at the upload
        uploads = request.environ.get("qproxy.uploads", [])
        keys = [u.key for u in uploads]
        if request.environ["qproxy.tus"]["metadata"].get("filename") == "refused-at-end.bin":
            return "no thanks\n", 422
        log = os.environ.get("QP_TUS_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps({"upload": upload_id, "keys": keys}) + "\n")
        return "", 204

    return app


def make_app() -> WSGIApplication:
    return UploadMiddleware(flask_app().wsgi_app)


def plain_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A bare WSGI callable: echoes the body it received and the uploads."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    uploads = [u.as_dict() for u in environ.get("qproxy.uploads", [])]
    out = json.dumps({"body": body.decode("latin-1"), "uploads": uploads}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
    )
    return [out]
