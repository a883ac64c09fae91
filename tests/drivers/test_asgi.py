"""The ASGI middleware under real uvicorn: Starlette, FastAPI, pass-through, a free loop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from qproxy.asgi import UploadMiddleware
from qproxy.compose import Stores
from qproxy.dev.devstack import Stack, free_port
from tests.conftest import serving, wait_state


@pytest.fixture(scope="module", params=["starlette_app", "fastapi_app"])
def asgi_url(request: pytest.FixtureRequest, stack: Stack) -> Iterator[str]:
    argv = [sys.executable, "-m", "uvicorn", "--factory", f"tests.asgi_apps:{request.param}",
            "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]  # fmt: skip
    with serving(stack, f"uvicorn-{request.param}", argv, "/") as url:
        yield url


def test_upload_under_uvicorn(asgi_url: str, stack: Stack) -> None:
    data = os.urandom(1024 * 1024 + 5)
    r = httpx.post(
        asgi_url + "/upload",
        files=[("file", ("one.bin", data)), ("file", ("two.txt", b"second", "text/plain"))],
        data={"title": "hello"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert len(body["keys"]) == 2
    assert [u["key"] for u in body["uploads"]] == body["keys"]
    node = Stores(stack.config)
    assert node.local.path_for(body["keys"][0]).read_bytes() == data
    wait_state(node, body["keys"][0], "remote")
    served = httpx.get(f"{stack.files_url}/media/{body['keys'][0]}", follow_redirects=True)
    assert served.content == data


def test_lifespan_passes_through(stack: Stack) -> None:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.asgi_apps:starlette_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "on",
    ]
    stack.spawn("uvicorn-lifespan", argv)
    try:
        stack.wait_for(
            "uvicorn-lifespan", lambda: httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        )
        assert httpx.get(f"http://127.0.0.1:{port}/lifespan").text == "True"
    finally:
        stack.services.pop("uvicorn-lifespan").stop()


def test_websocket_scope_passes_straight_through(node: Stores) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        pass

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"content-type", b"multipart/form-data")],
    }
    asyncio.run(UploadMiddleware(app, stores=node)(scope, receive, send))
    assert seen == [(scope, receive, send)]


PACE_SECONDS = 3.0


def test_event_loop_keeps_answering_during_a_big_upload(stack: Stack) -> None:
    """A 500 MiB upload streams while small GETs on the same server keep being answered."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.asgi_apps:starlette_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    stack.spawn("uvicorn-big", argv, env={"QPROXY_MAX_UPLOAD_BYTES": str(600 * 1024 * 1024)})
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for("uvicorn-big", lambda: httpx.get(url + "/ping").status_code == 200)
        size = 500 * 1024 * 1024
        block = os.urandom(1024 * 1024)
        boundary = b"qpbig"

        def body() -> Iterator[bytes]:
            # The app answers 400 (the status field comes first): the file is discarded.
            yield (
                b"--"
                + boundary
                + b'\r\nContent-Disposition: form-data; name="status"\r\n\r\n400\r\n'
            )
            yield (
                b"--"
                + boundary
                + b'\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
            )
            # Paced to last at least PACE_SECONDS: the pings below must fall inside the
            # upload however fast this machine parses (unpaced, a fast run ended after 17).
            started = time.monotonic()
            count = size // len(block)
            for i in range(count):
                yield block
                ahead = started + PACE_SECONDS * (i + 1) / count - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            yield b"\r\n--" + boundary + b"--\r\n"

        result: dict[str, Any] = {}

        def send_upload() -> None:
            result["status"] = httpx.post(
                url + "/upload",
                content=body(),
                headers={"Content-Type": "multipart/form-data; boundary=qpbig"},
                timeout=300,
            ).status_code

        uploader = threading.Thread(target=send_upload)
        uploader.start()
        latencies = []
        while uploader.is_alive():
            started = time.monotonic()
            assert httpx.get(url + "/ping", timeout=10).text == "pong"
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        uploader.join()
        assert result["status"] == 400
        # Blocking the loop for the upload would stall a GET for seconds; these stay short.
        assert len(latencies) >= 20, latencies
        assert max(latencies) < 1.0, max(latencies)
    finally:
        stack.services.pop("uvicorn-big").stop()
