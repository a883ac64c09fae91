"""One behaviour suite, run through both the WSGI and the ASGI middleware.

Each case drives the real middleware in this process (on the stack's Redis, Celery and
local root) with the same request, and checks what the app saw and what is left on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from qproxy import asgi, wsgi
from qproxy.compose import Stores
from tests.conftest import wait_state


@dataclass
class Result:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    app_called: bool = False
    app_body: bytes = b""
    app_key_header: str | None = None
    app_headers: dict[str, str] = field(default_factory=dict)
    uploads: list[dict[str, Any]] = field(default_factory=list)

    @property
    def form_text(self) -> str:
        return self.app_body.decode("latin-1")


@dataclass
class Request:
    body: bytes
    content_type: str | None
    method: str = "POST"
    path: str = "/upload"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    app_status: int = 201
    app_raises: bool = False
    # The client goes away after sending this many bytes of the body.
    cut_at: int | None = None


Driver = Callable[[Stores, Request], Result]


def drive_wsgi(node: Stores, req: Request) -> Result:
    seen = Result(status=0, body=b"")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.app_called = True
        seen.app_body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        seen.app_key_header = environ.get("HTTP_X_QPROXY_KEY")
        seen.app_headers = {
            k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        seen.uploads = [u.as_dict() for u in environ.get("qproxy.uploads", [])]
        if req.app_raises:
            raise RuntimeError("app bug")
        start_response(f"{req.app_status} X", [("Content-Type", "text/plain")])
        return [b"app answer"]

    environ: dict[str, Any] = {
        "REQUEST_METHOD": req.method,
        "PATH_INFO": req.path,
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(req.body[: req.cut_at]),
        "wsgi.errors": io.StringIO(),
    }
    if req.content_type:
        environ["CONTENT_TYPE"] = req.content_type
    if req.chunked:
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(len(req.body))
    for name, value in req.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.status = int(status.split()[0])
        seen.headers = {k.lower(): v for k, v in headers}
        return lambda data: None

    result = wsgi.UploadMiddleware(app, stores=node)(environ, start_response)
    try:
        seen.body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return seen


def drive_asgi(node: Stores, req: Request) -> Result:
    seen = Result(status=0, body=b"")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.app_called = True
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.app_body = body
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.app_key_header = headers.get("x-qproxy-key")
        seen.app_headers = headers
        assert headers["content-length"] == str(len(body))
        seen.uploads = [u.as_dict() for u in scope.get("qproxy.uploads", [])]
        if req.app_raises:
            raise RuntimeError("app bug")
        await send({"type": "http.response.start", "status": req.app_status, "headers": []})
        await send({"type": "http.response.body", "body": b"app answer"})

    headers = [(k.lower().encode(), v.encode()) for k, v in req.headers.items()]
    if req.content_type:
        headers.append((b"content-type", req.content_type.encode()))
    if not req.chunked:
        headers.append((b"content-length", str(len(req.body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req.method,
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    step = 64 * 1024
    chunks = [req.body[i : i + step] for i in range(0, len(req.body), step)] or [b""]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if req.cut_at is not None:
        sent = req.body[: req.cut_at]
        messages = [
            {"type": "http.request", "body": sent[i : i + step], "more_body": True}
            for i in range(0, len(sent), step)
        ]
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen.status = message["status"]
            seen.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        else:
            seen.body += message.get("body", b"")

    asyncio.run(asgi.UploadMiddleware(app, stores=node)(scope, receive, send))
    return seen


@pytest.fixture(params=["wsgi", "asgi"])
def drive(request: pytest.FixtureRequest) -> Driver:
    return drive_wsgi if request.param == "wsgi" else drive_asgi


def form(fields: dict[str, Any]) -> tuple[bytes, str]:
    # An explicit boundary: werkzeug's own is time() + random() and passes the 70
    # characters RFC 2046 allows once in ~400 encodings (measured; the upload is then a 400).
    boundary, data = encode_multipart(fields, boundary="qpTestBoundary7MA4YWxkTrZu0gW")
    return data, f"multipart/form-data; boundary={boundary}"


def file(data: bytes, name: str, ctype: str = "application/octet-stream") -> FileStorage:
    return FileStorage(io.BytesIO(data), filename=name, content_type=ctype)


def pending(node: Stores) -> list[Any]:
    return list(node.local.pending_files())


# -- the cases ------------------------------------------------------------------------------


def test_several_files_and_text_fields(drive: Driver, node: Stores) -> None:
    a, b = os.urandom(200_000), os.urandom(3_000)
    body, ctype = form(
        {"title": "two files", "a": file(a, "a.png", "image/png"), "b": file(b, "b.bin"), "x": "y"}
    )
    r = drive(node, Request(body, ctype))
    assert r.status == 201 and r.body == b"app answer"
    uploads = {u["field"]: u for u in r.uploads}
    assert set(uploads) == {"a", "b"}
    assert uploads["a"]["content_type"] == "image/png" and uploads["a"]["size"] == len(a)
    for name, data in (("a", a), ("b", b)):
        key = uploads[name]["key"]
        assert key in r.form_text
        assert node.local.path_for(key).read_bytes() == data
    assert "two files" in r.form_text and 'name="x"' in r.form_text
    assert pending(node) == []
    wait_state(node, uploads["a"]["key"], "remote")


def test_empty_file(drive: Driver, node: Stores) -> None:
    body, ctype = form({"f": file(b"", "empty.txt", "text/plain")})
    r = drive(node, Request(body, ctype))
    assert r.status == 201
    (u,) = r.uploads
    assert u["size"] == 0
    assert node.local.path_for(u["key"]).read_bytes() == b""


def test_file_at_the_size_limit(drive: Driver, node: Stores) -> None:
    body, ctype = form({"f": file(os.urandom(50_000), "edge.bin")})
    exact = Stores(node.config.replace(max_upload_bytes=len(body)))
    assert drive(exact, Request(body, ctype)).status == 201
    over = Stores(node.config.replace(max_upload_bytes=len(body) - 1))
    r = drive(over, Request(body, ctype))
    assert r.status == 413 and not r.app_called
    assert r.body == f"upload larger than {len(body) - 1} bytes\n".encode()
    r = drive(over, Request(body, ctype, chunked=True))
    assert r.status == 413 and not r.app_called
    assert pending(node) == []


def test_malformed_body(drive: Driver, node: Stores) -> None:
    body = b'--b0\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\ntruncated'
    r = drive(node, Request(body, "multipart/form-data; boundary=b0"))
    assert r.status == 400 and not r.app_called
    assert r.body.startswith(b"malformed multipart body") and r.body.count(b"\n") == 1
    assert r.headers["content-type"].startswith("text/plain")
    assert pending(node) == []


def test_big_bodies_and_late_errors(drive: Driver, node: Stores) -> None:
    """Bodies of several read chunks (the adapters parse one chunk while reading the next):
    every byte lands, and an error found late still refuses the whole upload."""
    one, two = os.urandom(5 * 1024 * 1024 + 7), os.urandom(2 * 1024 * 1024 - 3)
    body, ctype = form({"a": file(one, "one.bin"), "b": file(two, "two.bin"), "t": "x"})
    r = drive(node, Request(body, ctype))
    assert r.status == 201
    assert [u["sha256"] for u in r.uploads] == [
        hashlib.sha256(one).hexdigest(),
        hashlib.sha256(two).hexdigest(),
    ]
    for u, data in zip(r.uploads, (one, two), strict=True):
        assert node.local.path_for(u["key"]).read_bytes() == data

    cut = body[: len(body) - 200]  # the closing boundary and the text field are missing
    files_before = {p for p in node.local.root.rglob("*") if p.is_file()}
    r = drive(node, Request(cut, ctype))
    assert r.status == 400 and not r.app_called
    assert r.body.startswith(b"malformed multipart body")
    assert {p for p in node.local.root.rglob("*") if p.is_file()} == files_before


def test_missing_boundary(drive: Driver, node: Stores) -> None:
    r = drive(node, Request(b"x", "multipart/form-data"))
    assert (r.status, r.body) == (400, b"multipart/form-data without a valid boundary\n")


def test_app_error_status_discards(drive: Driver, node: Stores) -> None:
    body, ctype = form({"f": file(b"refused", "r.txt")})
    r = drive(node, Request(body, ctype, app_status=422))
    assert r.status == 422
    (u,) = r.uploads
    assert not node.local.exists(u["key"]) and node.state.get(u["key"]) is None
    assert pending(node) == []


def test_app_exception_discards(drive: Driver, node: Stores) -> None:
    body, ctype = form({"f": file(b"boom", "r.txt")})
    with pytest.raises(RuntimeError, match="app bug"):
        drive(node, Request(body, ctype, app_raises=True))
    assert pending(node) == []


def test_non_upload_requests_pass_through(drive: Driver, node: Stores) -> None:
    r = drive(node, Request(b'{"a": 1}', "application/json"))
    assert r.status == 201 and r.app_body == b'{"a": 1}' and r.uploads == []
    r = drive(node, Request(b"", None, method="GET", path="/"))
    assert r.status == 201 and r.uploads == []


def test_a_client_cannot_forge_the_key_header(drive: Driver, node: Stores) -> None:
    r = drive(
        node, Request(b"{}", "application/json", headers={"X-QProxy-Key": "2026/01/01/forged.txt"})
    )
    assert r.app_key_header is None


RAW = ("/files/*", "/raw/*/upload")


def raw_node(node: Stores, **changes: Any) -> Stores:
    return Stores(node.config.replace(raw_upload_paths=",".join(RAW), **changes))


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw"])
def test_client_gone_mid_body_keeps_nothing(drive: Driver, node: Stores, raw: bool) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    if raw:
        node = raw_node(node)
        req = Request(data, "application/octet-stream", method="PUT", path="/files/a.bin")
    else:
        body, ctype = form({"f": file(data, "a.bin")})
        req = Request(body, ctype)
    req.cut_at = 2 * 1024 * 1024 + 3
    files_before = {p for p in node.local.root.rglob("*") if p.is_file()}
    r = drive(node, req)
    assert not r.app_called
    if drive is drive_wsgi:  # a WSGI server hands over a short body; the client gets a 400
        assert r.status == 400
    assert pending(node) == []
    assert {p for p in node.local.root.rglob("*") if p.is_file()} == files_before


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_raw_body_upload(drive: Driver, node: Stores, chunked: bool) -> None:
    data = os.urandom(300_000)
    r = drive(
        raw_node(node),
        Request(data, "image/jpeg", method="PUT", path="/files/cat%20photo.jpg", chunked=chunked),
    )
    assert r.status == 201
    assert r.app_body == b""
    (u,) = r.uploads
    assert r.app_key_header == u["key"]
    assert (
        u["filename"] == "cat photo.jpg"
        and u["content_type"] == "image/jpeg"
        and u["size"] == len(data)
    )
    assert node.local.path_for(u["key"]).read_bytes() == data
    wait_state(node, u["key"], "remote")


def test_raw_body_name_from_content_disposition(drive: Driver, node: Stores) -> None:
    headers = {"Content-Disposition": "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"}
    r = drive(
        raw_node(node),
        Request(b"%PDF-1.7", None, method="POST", path="/raw/x/upload", headers=headers),
    )
    (u,) = r.uploads
    assert u["filename"] == "r\u00e9sum\u00e9.pdf"
    assert u["content_type"] == "application/pdf"
    assert u["key"].endswith(".pdf")


def test_raw_body_limits_and_other_paths(drive: Driver, node: Stores) -> None:
    small = raw_node(node, max_upload_bytes=1000)
    r = drive(
        small,
        Request(
            b"x" * 1001, "application/octet-stream", method="PUT", path="/files/big", chunked=True
        ),
    )
    assert r.status == 413 and not r.app_called
    assert pending(node) == []
    r = drive(small, Request(b"plain body", "text/plain", method="PUT", path="/elsewhere/x"))
    assert r.app_body == b"plain body" and r.uploads == []
    r = drive(small, Request(b"{}", "application/json", method="PATCH", path="/files/x"))
    assert r.app_body == b"{}" and r.uploads == []


def test_results_agree_between_adapters(node: Stores) -> None:
    body, ctype = form(
        {"t": "text \u00e9", "f": file(b"same bytes", "same.txt", "text/plain"), "n": "1"}
    )
    w, a = drive_wsgi(node, Request(body, ctype)), drive_asgi(node, Request(body, ctype))

    def strip(r: Result) -> str:
        return json.dumps(
            [{k: v for k, v in u.items() if k not in ("key", "url")} for u in r.uploads]
        )

    assert strip(w) == strip(a)
    assert w.form_text.replace(w.uploads[0]["key"], "K") == a.form_text.replace(
        a.uploads[0]["key"], "K"
    )


# -- offload mode: nginx wrote the raw body to disk and names the file ---------------------


def _offloaded(node: Stores, data: bytes) -> str:
    """A body file as nginx leaves it: 0600, in the store's offload folder."""
    folder = node.local.offload_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.urandom(5).hex()}"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return str(path)


def _nginx_headers(node: Stores, body_file: str, **extra: str) -> dict[str, str]:
    from qproxy.headers import offload_token

    return {
        "X-QProxy-Body-File": body_file,
        "X-QProxy-Body-Token": offload_token(node.config.secret),
        **extra,
    }


def test_offloaded_raw_body_is_taken_not_copied(drive: Driver, node: Stores) -> None:
    raw = raw_node(node)
    data = os.urandom(700_000)
    body_file = _offloaded(raw, data)
    inode = os.stat(body_file).st_ino
    r = drive(
        raw,
        Request(
            b"",
            "video/mp4",
            method="PUT",
            path="/files/clip.mp4",
            headers=_nginx_headers(raw, body_file),
        ),
    )
    assert r.status == 201, r.body
    (u,) = r.uploads
    assert r.app_key_header == u["key"] and u["size"] == len(data)
    assert u["sha256"] == hashlib.sha256(data).hexdigest()
    stored = node.local.path_for(u["key"])
    assert stored.read_bytes() == data
    assert os.stat(stored).st_ino == inode, "the body was copied, not renamed"
    assert oct(os.stat(stored).st_mode & 0o777) == "0o644"  # nginx wrote it 0600
    assert not os.path.exists(body_file)
    # The app never sees nginx's headers.
    assert not {"x-qproxy-body-file", "x-qproxy-body-token"} & set(r.app_headers)
    wait_state(node, u["key"], "remote")


def test_offloaded_empty_body(drive: Driver, node: Stores) -> None:
    raw = raw_node(node)
    headers = _nginx_headers(raw, "")
    del headers["X-QProxy-Body-File"]  # nginx writes no file for an empty body
    r = drive(raw, Request(b"", None, method="PUT", path="/files/empty.txt", headers=headers))
    assert r.status == 201, r.body
    (u,) = r.uploads
    assert u["size"] == 0 and node.local.path_for(u["key"]).read_bytes() == b""


def test_offload_refuses_what_nginx_did_not_write(
    drive: Driver, node: Stores, tmp_path: Any
) -> None:
    raw = raw_node(node)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not an upload")
    link = raw.local.offload_dir / f"link-{os.urandom(4).hex()}"
    raw.local.offload_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    cases = [
        # a client naming a file without nginx's token
        {"X-QProxy-Body-File": _offloaded(raw, b"x"), "X-QProxy-Body-Token": "guess"},
        {"X-QProxy-Body-File": _offloaded(raw, b"x")},
        # a file outside nginx's folder, even with the token
        _nginx_headers(raw, str(secret)),
        _nginx_headers(raw, str(link)),
        _nginx_headers(raw, str(raw.local.offload_dir / ".." / "tmp" / "x")),
    ]
    for headers in cases:
        r = drive(raw, Request(b"", "text/plain", method="PUT", path="/files/x", headers=headers))
        assert r.status == 400 and not r.app_called, (headers, r.status, r.body)
    assert secret.read_bytes() == b"not an upload" and link.is_symlink()
    # The offload headers on a multipart upload are refused too.
    body, ctype = form({"f": file(b"abc", "a.txt")})
    r = drive(raw, Request(body, ctype, headers=_nginx_headers(raw, _offloaded(raw, b"y"))))
    assert r.status == 400 and not r.app_called
    assert pending(node) == []


def test_offload_limits_and_refusals_leave_nothing(drive: Driver, node: Stores) -> None:
    small = raw_node(node, max_upload_bytes=1000)
    body_file = _offloaded(small, b"z" * 1001)
    r = drive(
        small,
        Request(
            b"", None, method="PUT", path="/files/big", headers=_nginx_headers(small, body_file)
        ),
    )
    assert r.status == 413 and not r.app_called
    assert pending(node) == [] and not os.path.exists(body_file)
    body_file = _offloaded(small, b"refused")
    r = drive(
        small,
        Request(
            b"",
            None,
            method="PUT",
            path="/files/no",
            app_status=403,
            headers=_nginx_headers(small, body_file),
        ),
    )
    assert r.status == 403 and r.app_called
    (u,) = r.uploads
    assert pending(node) == [] and not node.local.exists(u["key"])
