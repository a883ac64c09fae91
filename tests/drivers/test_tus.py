"""Resumable uploads (tus 1.0.0) through nginx and the WSGI middleware, with tuspy (PyPI),
a client nobody here wrote, and with plain requests for the protocol's error answers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import _stack, needs_nginx, wait_state

V = {"Tus-Resumable": "1.0.0"}
OFFSET = {"Content-Type": "application/offset+octet-stream"}


@pytest.fixture(
    scope="module",
    params=["tests.apps:make_app", "tests.asgi_apps:starlette_app"],
    ids=["wsgi", "asgi"],
)
def tus_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    # Both middlewares speak tus: a Flask app (WSGI) and a Starlette app (ASGI).
    log = Path(tempfile.mkdtemp(prefix="qp-tus-")) / "completed.jsonl"
    with _stack(
        app=request.param,
        QPROXY_TUS_PATH="/tus/",
        QPROXY_TUS_CORS_ORIGINS="https://app.example.com",
        QP_TUS_LOG=str(log),
    ) as stack:
        stack.tus_log = log  # type: ignore[attr-defined]
        yield stack


def completed(stack: Stack, upload_url: str) -> str:
    """The key the app was handed for the upload at ``upload_url``."""
    upload_id = upload_url.rstrip("/").rsplit("/", 1)[-1]
    for line in stack.tus_log.read_text().splitlines():  # type: ignore[attr-defined]
        entry = json.loads(line)
        if entry["upload"] == upload_id:
            return str(entry["keys"][0])
    raise AssertionError(f"{upload_id} never completed")


def s3_bytes(stack: Stack, key: str) -> bytes:
    record = Stores(stack.config).state.get(key)
    assert record is not None
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    return s3.get_object(Bucket="qproxy-dev", Key=record.object)["Body"].read()


def meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


@needs_nginx
def test_tuspy_uploads_in_chunks_and_resumes_after_the_server_is_killed(
    tus_stack: Stack, tmp_path: Path
) -> None:
    stack = tus_stack
    data = os.urandom(5 * 1024 * 1024 + 123)
    source = tmp_path / "holiday.mp4"
    source.write_bytes(data)
    client = tus_client.TusClient(f"{stack.front}/tus/")
    # (Given a path, tuspy opens the file and never closes it: the test hands it streams.)
    with open(source, "rb") as stream:
        uploader = client.uploader(
            file_stream=stream, chunk_size=1024 * 1024, metadata={"filename": "holiday.mp4"}
        )
        uploader.upload_chunk()
        uploader.upload_chunk()
        assert uploader.offset == 2 * 1024 * 1024
        url = uploader.url
        # The app server dies (kill -9) with two chunks acknowledged, and comes back.
        stack.services["app"].signal(signal.SIGKILL)
        with pytest.raises(TusCommunicationError):
            uploader.upload_chunk()
    stack.restart("app")
    # A new client resumes from the offset the server holds (HEAD), not from zero.
    with open(source, "rb") as stream:
        resumed = client.uploader(file_stream=stream, url=url, chunk_size=1024 * 1024)
        assert resumed.offset == 2 * 1024 * 1024
        resumed.upload()
    key = completed(stack, url)
    wait_state(Stores(stack.config), key, "remote")
    body = s3_bytes(stack, key)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    record = Stores(stack.config).state.get(key)
    assert record is not None and record.filename == "holiday.mp4"
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    # Served like any upload.
    served = httpx.get(f"{stack.front}/media/{key}", follow_redirects=True, timeout=30)
    assert served.content == data


@needs_nginx
def test_the_protocols_answers(tus_stack: Stack) -> None:
    base = f"{tus_stack.front}/tus/"
    with httpx.Client(timeout=30) as http:
        options = http.options(base)
        assert options.status_code == 204 and options.headers["tus-version"] == "1.0.0"
        assert "checksum" in options.headers["tus-extension"]
        assert http.post(base, headers={"Upload-Length": "5"}).status_code == 412
        # The app refuses a creation: its status.
        refused = http.post(
            base,
            headers={**V, "Upload-Length": "5", "Upload-Metadata": meta(filename="refused.bin")},
        )
        assert refused.status_code == 403 and refused.text == "not for you\n"
        made = http.post(base, headers={**V, "Upload-Length": "10"})
        assert made.status_code == 201
        url = tus_stack.front + made.headers["location"]
        head = http.head(url, headers=V)
        assert head.headers["upload-offset"] == "0" and head.headers["upload-length"] == "10"
        assert head.headers["cache-control"] == "no-store"
        # Wrong offset: 409; past the length: 413; a bad checksum: 460 and nothing kept.
        wrong = http.patch(url, headers={**V, **OFFSET, "Upload-Offset": "3"}, content=b"abc")
        assert wrong.status_code == 409
        long = http.patch(url, headers={**V, **OFFSET, "Upload-Offset": "0"}, content=b"x" * 11)
        assert long.status_code == 413
        bad = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        mismatch = http.patch(
            url,
            headers={**V, **OFFSET, "Upload-Offset": "0", "Upload-Checksum": f"sha1 {bad}"},
            content=b"hello",
        )
        assert mismatch.status_code == 460
        assert http.head(url, headers=V).headers["upload-offset"] == "0"
        good = base64.b64encode(hashlib.sha1(b"hello").digest()).decode()
        ok = http.patch(
            url,
            headers={**V, **OFFSET, "Upload-Offset": "0", "Upload-Checksum": f"sha1 {good}"},
            content=b"hello",
        )
        assert ok.status_code == 204 and ok.headers["upload-offset"] == "5"
        # Termination: gone on disk, never in S3.
        upload_id = url.rsplit("/", 1)[-1]
        partial = tus_stack.config.local_path / ".qp" / "tus" / f"{upload_id}.bin"
        assert partial.exists()
        assert http.delete(url, headers=V).status_code == 204
        assert not partial.exists()
        assert http.head(url, headers=V).status_code == 404
        # Deferred length, creation-with-upload, and the app refusing at the end.
        deferred = http.post(
            base,
            headers={
                **V,
                **OFFSET,
                "Upload-Defer-Length": "1",
                "Upload-Metadata": meta(filename="refused-at-end.bin"),
            },
            content=b"12345",
        )
        assert deferred.status_code == 201 and deferred.headers["upload-offset"] == "5"
        url = tus_stack.front + deferred.headers["location"]
        assert http.head(url, headers=V).headers["upload-defer-length"] == "1"
        end = http.patch(
            url, headers={**V, **OFFSET, "Upload-Offset": "5", "Upload-Length": "8"}, content=b"678"
        )
        assert end.status_code == 422 and end.text == "no thanks\n"
        # Nothing kept that the app did not accept.
        time.sleep(0.2)
        upload_id = url.rsplit("/", 1)[-1]
        assert not (tus_stack.config.local_path / ".qp" / "tus" / f"{upload_id}.bin").exists()
        assert list(Stores(tus_stack.config).local.pending_files()) == []
        # An app that answers 2xx without reading qproxy.uploads took nothing: the client
        # is told so, and nothing is kept.
        ignored = http.post(
            base,
            headers={
                **V,
                **OFFSET,
                "Upload-Length": "3",
                "Upload-Metadata": meta(filename="ignored.bin"),
            },
            content=b"abc",
        )
        assert ignored.status_code == 400, ignored.text
        assert "not kept" in ignored.text and "qproxy.uploads" in ignored.text
        assert ignored.headers["tus-resumable"] == "1.0.0"
        time.sleep(0.2)
        assert list(Stores(tus_stack.config).local.pending_files()) == []
        assert not list((tus_stack.config.local_path / ".qp" / "tus").glob("*.bin"))


@needs_nginx
def test_an_expired_upload_is_gone(tus_stack: Stack) -> None:
    from qproxy.worker.sweep import sweep

    base = f"{tus_stack.front}/tus/"
    made = httpx.post(base, headers={**V, "Upload-Length": "10"}, timeout=30)
    url = tus_stack.front + made.headers["location"]
    upload_id = url.rsplit("/", 1)[-1]
    partial = tus_stack.config.local_path / ".qp" / "tus" / f"{upload_id}.bin"
    assert partial.exists()
    # The sweep, a day later (QPROXY_TUS_EXPIRE_SECONDS): removed, 404.
    later = time.time() + tus_stack.config.tus_expire_seconds + 1
    report = sweep(Stores(tus_stack.config), now=later, cluster=False)
    assert report.tus_expired >= 1 and not partial.exists()
    assert httpx.head(url, headers=V, timeout=30).status_code == 404


@needs_nginx
def test_four_partial_uploads_sent_in_parallel_concatenate_into_one_file(
    tus_stack: Stack,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    base = f"{tus_stack.front}/tus/"
    pieces = [os.urandom(300_000 + i) for i in range(4)]

    def send(piece: bytes) -> str:
        with httpx.Client(timeout=30) as http:
            made = http.post(
                base, headers={**V, "Upload-Length": str(len(piece)), "Upload-Concat": "partial"}
            )
            assert made.status_code == 201
            url = made.headers["location"]
            half = len(piece) // 2
            for start, end in ((0, half), (half, len(piece))):
                sent = http.patch(
                    tus_stack.front + url,
                    headers={**V, **OFFSET, "Upload-Offset": str(start)},
                    content=piece[start:end],
                )
                assert sent.status_code == 204
            head = http.head(tus_stack.front + url, headers=V)
            assert head.headers["upload-concat"] == "partial"
            return str(url)

    with ThreadPoolExecutor(4) as pool:
        urls = list(pool.map(send, pieces))
    final = httpx.post(
        base,
        headers={
            **V,
            "Upload-Concat": "final;" + " ".join(urls),
            "Upload-Metadata": meta(filename="joined.bin"),
        },
        timeout=30,
    )
    assert final.status_code == 201, final.text
    key = completed(tus_stack, final.headers["location"])
    wait_state(Stores(tus_stack.config), key, "remote")
    assert s3_bytes(tus_stack, key) == b"".join(pieces)
    # The parts are gone (their bytes are in the final file); a final cannot be patched.
    for url in urls:
        assert httpx.head(tus_stack.front + url, headers=V, timeout=30).status_code == 404


@needs_nginx
def test_browser_clients_on_an_allowed_origin_get_cors(tus_stack: Stack) -> None:
    base = f"{tus_stack.front}/tus/"
    mine = {"Origin": "https://app.example.com"}
    preflight = httpx.options(
        base,
        headers={
            **mine,
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
        },
        timeout=30,
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    assert "upload-offset" in preflight.headers["access-control-allow-headers"].lower()
    made = httpx.post(base, headers={**V, **mine, "Upload-Length": "3"}, timeout=30)
    assert made.headers["access-control-allow-origin"] == "https://app.example.com"
    exposed = made.headers["access-control-expose-headers"].lower()
    assert "location" in exposed and "upload-offset" in exposed
    # The app's own refusal is readable too; another origin gets no CORS at all.
    refused = httpx.post(
        base,
        headers={
            **V,
            **mine,
            "Upload-Length": "5",
            "Upload-Metadata": meta(filename="refused.bin"),
        },
        timeout=30,
    )
    assert refused.status_code == 403 and "access-control-allow-origin" in refused.headers
    other = httpx.post(
        base, headers={**V, "Origin": "https://evil.example", "Upload-Length": "3"}, timeout=30
    )
    assert "access-control-allow-origin" not in other.headers


TUS_JS = Path(__file__).resolve().parents[2] / ".cache" / "tusjs" / "node_modules" / "tus-js-client"


def tus_js(*args: str) -> dict[str, object]:
    script = Path(__file__).resolve().parents[1] / "js" / "tus_upload.js"
    done = subprocess.run(
        ["node", str(script), *args],
        env={**os.environ, "TUS_JS_CLIENT": str(TUS_JS)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@needs_nginx
@pytest.mark.skipif(
    not shutil.which("node"), reason="node is not installed (make test installs npm)"
)
def test_tus_js_client_resumes_after_the_server_is_killed(tus_stack: Stack, tmp_path: Path) -> None:
    assert TUS_JS.exists(), "tus-js-client is missing: `make test` installs it (npm)"
    stack = tus_stack
    data = os.urandom(3 * 1024 * 1024 + 7)
    source = tmp_path / "phone-video.bin"
    source.write_bytes(data)
    chunk = str(512 * 1024)
    first = tus_js(f"{stack.front}/tus/", str(source), chunk, "--stop-after", str(1024 * 1024))
    assert first["done"] is False and first["offset"] == 1024 * 1024
    # kill -9 of the app server with 1 MiB acknowledged; the client comes back later.
    stack.services["app"].signal(signal.SIGKILL)
    stack.restart("app")
    url = str(first["url"])
    second = tus_js(f"{stack.front}/tus/", str(source), chunk, "--resume", url)
    assert second["done"] is True and second["startedAt"] == 1024 * 1024  # not from zero
    key = completed(stack, url)
    wait_state(Stores(stack.config), key, "remote")
    assert s3_bytes(stack, key) == data


@needs_nginx
def test_the_hash_kept_while_appending_is_the_files(tus_stack: Stack) -> None:
    # PATCHes to one process: the SHA-256 is kept as the bytes come (no second read), and
    # a chunk refused for its checksum leaves no trace in it.
    data = os.urandom(2 * 1024 * 1024 + 5)
    base = f"{tus_stack.front}/tus/"
    with httpx.Client(timeout=30) as http:
        made = http.post(
            base,
            headers={
                **V,
                "Upload-Length": str(len(data)),
                "Upload-Metadata": meta(filename="k.bin"),
            },
        )
        url = tus_stack.front + made.headers["location"]
        half = len(data) // 2
        assert (
            http.patch(
                url, headers={**V, **OFFSET, "Upload-Offset": "0"}, content=data[:half]
            ).status_code
            == 204
        )
        wrong = base64.b64encode(hashlib.sha1(b"nope").digest()).decode()
        assert (
            http.patch(
                url,
                headers={
                    **V,
                    **OFFSET,
                    "Upload-Offset": str(half),
                    "Upload-Checksum": f"sha1 {wrong}",
                },
                content=data[half:],
            ).status_code
            == 460
        )
        assert (
            http.patch(
                url, headers={**V, **OFFSET, "Upload-Offset": str(half)}, content=data[half:]
            ).status_code
            == 204
        )
    key = completed(tus_stack, url)
    node = Stores(tus_stack.config)
    record = node.state.get(key)
    assert record is not None and record.sha256 == hashlib.sha256(data).hexdigest()
    wait_state(node, key, "remote")  # the worker checks S3's checksum against it
    assert s3_bytes(tus_stack, key) == data


@needs_nginx
def test_a_client_gone_mid_patch_keeps_what_arrived(tus_stack: Stack) -> None:
    # A phone losing its connection mid-PATCH: the bytes that reached the server are kept
    # (fsynced), and HEAD says how many, so the client resumes from there.
    created = httpx.post(
        f"{tus_stack.front}/tus/", headers={**V, "Upload-Length": str(8 * 1024 * 1024)}
    )
    path = created.headers["location"]
    data = os.urandom(3 * 1024 * 1024)
    port = int(tus_stack.front.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            (
                f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                f"Content-Length: {8 * 1024 * 1024}\r\n\r\n"
            ).encode()
            + data
        )
        time.sleep(0.5)  # (the bytes reach the app before the connection goes)
    url = tus_stack.front + path
    deadline = time.monotonic() + 10
    while True:  # the server notices the client is gone, then answers HEAD
        head = httpx.head(url, headers=V)
        offset = int(head.headers.get("upload-offset", "0"))
        if (head.status_code == 200 and offset == len(data)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert head.status_code == 200 and offset == len(data), (head.status_code, offset)
    # And it goes on from there.
    rest = os.urandom(8 * 1024 * 1024 - len(data))
    done = httpx.patch(
        url, headers={**V, **OFFSET, "Upload-Offset": str(offset)}, content=rest, timeout=30
    )
    assert done.status_code == 204, done.text
    key = completed(tus_stack, url)
    wait_state(Stores(tus_stack.config), key, "remote")
    assert s3_bytes(tus_stack, key) == data + rest
