"""The WSGI middleware in this process, on the real stack's Redis, Celery and S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tempfile
import tracemalloc
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import encode_multipart

from qproxy.compose import Stores
from qproxy.wsgi import UploadMiddleware
from tests.apps import flask_app, plain_app
from tests.conftest import wait_state

Environ = dict[str, Any]


class Stream(io.RawIOBase):
    """A request body produced on the fly (never held in memory whole)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        while n < 0 or len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def call(
    app: Any,
    body: bytes | Stream,
    content_type: str,
    *,
    length: int | None = None,
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    environ: Environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/upload",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body) if isinstance(body, bytes) else body,
        "wsgi.errors": io.StringIO(),
        "CONTENT_TYPE": content_type,
    }
    if chunked:
        environ["wsgi.input_terminated"] = True
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    elif length is not None:
        environ["CONTENT_LENGTH"] = str(length)
    elif isinstance(body, bytes):
        environ["CONTENT_LENGTH"] = str(len(body))
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Any:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return seen["status"], seen["headers"], out


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    # An explicit boundary: werkzeug's own is time() + random() and passes the 70
    # characters RFC 2046 allows once in ~400 encodings (measured; the upload is then a 400).
    boundary, data = encode_multipart(fields, boundary="qpTestBoundary7MA4YWxkTrZu0gW")
    return data, f"multipart/form-data; boundary={boundary}"


def file_field(data: bytes, name: str, ctype: str = "application/octet-stream") -> Any:
    from werkzeug.datastructures import FileStorage

    return FileStorage(io.BytesIO(data), filename=name, content_type=ctype)


def temp_files(node: Stores) -> list[Path]:
    return list(node.local.pending_files())


def test_plain_wsgi_app_gets_keys_and_files_are_stored(node: Stores) -> None:
    one, two = os.urandom(300_000), b"hello"
    body, ctype = multipart(
        {
            "title": "trip",
            "photo": file_field(one, "beach.jpg", "image/jpeg"),
            "doc": file_field(two, "a.txt"),
        }
    )
    status, _, out = call(UploadMiddleware(plain_app, stores=node), body, ctype)
    assert status == 200
    echoed = json.loads(out)
    uploads = {u["field"]: u for u in echoed["uploads"]}
    assert set(uploads) == {"photo", "doc"}
    photo = uploads["photo"]
    assert photo["filename"] == "beach.jpg"
    assert photo["content_type"] == "image/jpeg"
    assert photo["size"] == len(one)
    assert photo["sha256"] == hashlib.sha256(one).hexdigest()
    assert photo["url"] == "/media/" + photo["key"]
    assert photo["key"].endswith(".jpg")
    # The app's body: the same form, with keys for files.
    assert photo["key"] in echoed["body"] and uploads["doc"]["key"] in echoed["body"]
    assert "trip" in echoed["body"]
    assert one[:50].decode("latin-1") not in echoed["body"]
    # On disk, world-readable for nginx, byte for byte.
    path = node.local.path_for(photo["key"])
    assert path.read_bytes() == one
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert temp_files(node) == []
    # Committed: a record, and the real worker moves it to S3.
    wait_state(node, photo["key"], "remote")
    record = node.state.get(photo["key"])
    assert record is not None and record.sha256 == photo["sha256"]


def test_flask_sees_a_form_without_files(node: Stores) -> None:
    body, ctype = multipart({"file": file_field(b"x" * 1000, "x.bin"), "name": "n"})
    status, _, out = call(UploadMiddleware(flask_app().wsgi_app, stores=node), body, ctype)
    assert status == 201
    data = json.loads(out)
    assert data["files"] == []
    assert data["form"]["name"] == ["n"]
    (key,) = data["keys"]
    assert data["uploads"][0]["key"] == key
    assert node.local.path_for(key).read_bytes() == b"x" * 1000
    assert node.state.get(key) is not None


@pytest.mark.parametrize("status", ["400", "404", "500"])
def test_refused_request_leaves_nothing(node: Stores, status: str) -> None:
    body, ctype = multipart({"file": file_field(b"data" * 100, "r.txt"), "status": status})
    code, _, out = call(UploadMiddleware(flask_app().wsgi_app, stores=node), body, ctype)
    assert code == int(status)
    key = json.loads(out)["keys"][0]
    assert not node.local.exists(key)
    assert node.state.get(key) is None
    assert temp_files(node) == []


def test_app_that_raises_leaves_nothing(node: Stores) -> None:
    seen: list[str] = []

    def broken(environ: Environ, start_response: Any) -> Iterable[bytes]:
        seen.extend(u.key for u in environ["qproxy.uploads"])
        raise RuntimeError("app bug")

    body, ctype = multipart({"file": file_field(b"abc", "a.txt")})
    with pytest.raises(RuntimeError, match="app bug"):
        call(UploadMiddleware(broken, stores=node), body, ctype)
    assert seen and not node.local.exists(seen[0])
    assert temp_files(node) == []


def never_called(environ: Environ, start_response: Any) -> Iterable[bytes]:
    raise AssertionError("the app must not be called")


@pytest.mark.parametrize(
    "body, ctype",
    [
        (
            b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\ntrunc',
            "multipart/form-data; boundary=xyz",
        ),
        (b"no boundary here", "multipart/form-data; boundary=xyz"),
        (b"", "multipart/form-data"),
        (b"--xyz\r\nBroken-Header\r\n\r\nv\r\n--xyz--\r\n", "multipart/form-data; boundary=xyz"),
    ],
    ids=["truncated", "no-boundary-in-body", "no-boundary-param", "no-disposition"],
)
def test_malformed_multipart_is_400(node: Stores, body: bytes, ctype: str) -> None:
    status, headers, out = call(UploadMiddleware(never_called, stores=node), body, ctype)
    assert status == 400
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert headers["Content-Type"].startswith("text/plain")
    assert temp_files(node) == []


def test_too_large_by_content_length_is_413_before_reading(node: Stores) -> None:
    config = node.config.replace(max_upload_bytes=1000)
    mw = UploadMiddleware(never_called, stores=Stores(config))
    body, ctype = multipart({"file": file_field(b"x" * 5000, "big.bin")})
    status, _, out = call(mw, body, ctype)
    assert status == 413
    assert b"larger than 1000 bytes" in out


def test_too_large_chunked_removes_the_partial_file(node: Stores) -> None:
    small = Stores(node.config.replace(max_upload_bytes=2 * 1024 * 1024))
    body, ctype = multipart({"file": file_field(os.urandom(3 * 1024 * 1024), "big.bin")})
    status, _, _ = call(UploadMiddleware(never_called, stores=small), body, ctype, chunked=True)
    assert status == 413
    assert temp_files(node) == []


def test_length_is_required(node: Stores) -> None:
    body, ctype = multipart({"file": file_field(b"x", "x")})
    status, _, out = call(UploadMiddleware(never_called, stores=node), Stream([body]), ctype)
    assert status == 411
    assert out == b"a Content-Length is required for uploads\n"


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "a\r\nX-Accel-Redirect: /x",
        "",
        "n" * 10_000,
        "\u00fcber caf\u00e9 \u65e5\u672c.png",
    ],
    ids=["traversal", "header-injection", "empty", "10k", "non-ascii"],
)
def test_hostile_filenames_get_safe_keys(node: Stores, filename: str) -> None:
    # RFC 5987 filename*: any character, CR and LF included, reaches the parser intact.
    encoded = urllib.parse.quote(filename, safe="")
    body = (
        '--b0\r\nContent-Disposition: form-data; name="file"; '
        f"filename*=UTF-8''{encoded}\r\n\r\npayload\r\n--b0--\r\n"
    ).encode()
    ctype = "multipart/form-data; boundary=b0"
    status, _, out = call(UploadMiddleware(plain_app, stores=node), body, ctype)
    assert status == 200
    (upload,) = json.loads(out)["uploads"]
    key = upload["key"]
    assert ".." not in key and "\r" not in key and not key.startswith("/")
    path = node.local.path_for(key)
    assert path.read_bytes() == b"payload"
    assert os.path.commonpath([node.local.root, path]) == str(node.local.root)
    assert "\r" not in upload["filename"] and "\n" not in upload["filename"]
    assert len(upload["filename"]) <= 255


def test_non_multipart_and_get_pass_through(node: Stores) -> None:
    status, _, out = call(UploadMiddleware(plain_app, stores=node), b'{"a": 1}', "application/json")
    assert status == 200
    assert json.loads(out) == {"body": '{"a": 1}', "uploads": []}


def test_memory_stays_flat_for_a_large_upload(node: Stores) -> None:
    size = 96 * 1024 * 1024
    boundary = "----qpmem"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = os.urandom(1024 * 1024)

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(size // len(block)):
            yield block
        yield tail

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(
            "400 Bad Request", [("Content-Type", "text/plain")]
        )  # discard: keep disk tidy
        return [b"x"]

    tracemalloc.start()
    try:
        status, _, _ = call(
            UploadMiddleware(app, stores=Stores(node.config.replace(max_upload_bytes=2**30))),
            Stream(chunks()),
            f"multipart/form-data; boundary={boundary}",
            length=len(head) + size + len(tail),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 400
    # Chunks are 256 KiB and the source generator holds 1 MiB: a few MiB at most, never ~96.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_is_507_and_leaves_nothing(node: Stores) -> None:
    mount = Path(tempfile.mkdtemp(prefix="qproxy-full-"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here")
    try:
        full = Stores(node.config.replace(local_root=str(mount / "files")))
        body, ctype = multipart({"file": file_field(os.urandom(2 * 1024 * 1024), "big.bin")})
        status, _, out = call(UploadMiddleware(never_called, stores=full), body, ctype)
        assert status == 507, (status, out)
        assert b"disk full" in out
        assert list(full.local.pending_files()) == [], list(full.local.pending_files())
        # Space is back for a file that fits.
        body, ctype = multipart({"file": file_field(b"small", "s.txt")})
        status, _, out = call(UploadMiddleware(plain_app, stores=full), body, ctype)
        assert status == 200, (status, out)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()
