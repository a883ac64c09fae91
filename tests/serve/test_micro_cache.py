"""nginx micro-caching of the resolver's answers (`qproxy nginx-config --micro-cache`).

Real nginx with the shipped config, beside the session stack: hot keys are answered from
nginx's cache, misses are never cached, HEAD and GET keep their own presigned URLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from qproxy.ops.nginx import NginxOptions, full_config
from tests.conftest import needs_nginx, wait_state

pytestmark = needs_nginx


def _lookups(stack: Stack) -> int:
    text = httpx.get(stack.url("resolver") + "/metrics").text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("qproxy_resolve_total")
        )
    )


@pytest.fixture(scope="module", params=["x-accel", "auth_request"])
def cached(request: pytest.FixtureRequest, stack: Stack) -> Iterator[str]:
    if not stack.use_nginx:
        pytest.skip("nginx is not installed")
    options = NginxOptions(
        listen="127.0.0.1:{port}",
        app=stack.url("app"),
        resolver=stack.url("resolver"),
        mode=request.param,
        micro_cache=True,
    )
    name = f"nginx-micro-{request.param}"
    url = stack.add_nginx(name, full_config(stack.config, options))
    yield url
    stack.services.pop(name).stop()


def _upload(stack: Stack, data: bytes, name: str = "hot.bin") -> str:
    r = httpx.post(stack.front + "/upload", files={"file": (name, data)})
    r.raise_for_status()
    key: str = r.json()["keys"][0]
    return key


def test_hot_key_is_answered_from_nginx_cache(cached: str, stack: Stack) -> None:
    data = os.urandom(50_000)
    key = _upload(stack, data)
    with httpx.Client(follow_redirects=True) as client:
        client.get(f"{cached}/media/{key}")  # fills the cache
        before = _lookups(stack)
        bodies = [client.get(f"{cached}/media/{key}") for _ in range(40)]
        asked = _lookups(stack) - before
    assert all(r.status_code == 200 and r.content == data for r in bodies)
    # 40 requests in well under a few seconds, a 1 s TTL: a handful of lookups at most.
    assert asked <= 8, f"the resolver was asked {asked} times for 40 requests"

    # Without the micro-cache every request asks the resolver.
    before = _lookups(stack)
    for _ in range(10):
        assert httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True).content == data
    assert _lookups(stack) - before >= 10


def test_a_miss_is_not_cached(cached: str, stack: Stack, node: Stores, tmp_path: Path) -> None:
    key = f"micro/{os.urandom(6).hex()}.txt"
    assert httpx.get(f"{cached}/media/{key}").status_code == 404
    src = tmp_path / "late.txt"
    src.write_bytes(b"arrived after a 404\n")
    env = {**os.environ, **stack.env}
    subprocess.run(
        [sys.executable, "-m", "qproxy", "put", "--key", key, str(src)],
        env=env,
        check=True,
        capture_output=True,
    )
    r = httpx.get(f"{cached}/media/{key}", follow_redirects=True)
    assert r.status_code == 200, "a 404 was served from nginx's cache after the file arrived"
    assert r.content == b"arrived after a 404\n"


def test_head_and_get_keep_their_own_presigned_urls(
    cached: str, stack: Stack, node: Stores
) -> None:
    key = _upload(stack, b"remote bytes" * 100, "r.bin")
    wait_state(node, key, "remote")
    for _ in range(2):  # the second round comes from the cache
        get = httpx.get(f"{cached}/media/{key}")
        head = httpx.head(f"{cached}/media/{key}")
        assert get.status_code == head.status_code == 302
        assert get.headers["location"] != head.headers["location"]
        assert httpx.get(get.headers["location"]).content == b"remote bytes" * 100


def test_x_accel_mode_shows_each_file_as_it_does_without_the_cache(
    cached: str, stack: Stack, request: pytest.FixtureRequest
) -> None:
    """X-Accel mode's micro-cache asks with a cached subrequest: still each file with its
    record's type, disposition and safety headers, as the same mode without the cache."""
    if request.node.callspec.params["cached"] != "x-accel":
        pytest.skip("auth_request mode has its own types (by name) with or without it")
    files = [("page.html", "text/html"), ("cat.png", "image/png"), ("notes", "text/plain"),
             ("song", "audio/mpeg"), ("x.svg", "image/svg+xml")]  # fmt: skip
    stack.services["worker"].signal(signal.SIGSTOP)  # (the files stay local meanwhile)
    try:
        _compare(cached, stack, files)
    finally:
        stack.services["worker"].signal(signal.SIGCONT)


def _compare(cached: str, stack: Stack, files: list[tuple[str, str]]) -> None:
    for name, ctype in files:
        data = b"bytes of " + name.encode()
        r = httpx.post(stack.front + "/upload", files={"file": (name, data, ctype)})
        r.raise_for_status()
        key = r.json()["keys"][0]
        want = httpx.get(f"{stack.front}/media/{key}")
        assert want.status_code == 200 and want.content == data
        for _ in range(2):  # a miss, then a hit
            got = httpx.get(f"{cached}/media/{key}")
            assert got.status_code == 200 and got.content == data
            for header in ("content-type", "content-disposition", "x-content-type-options",
                           "content-security-policy", "cache-control", "etag"):  # fmt: skip
                assert got.headers.get(header) == want.headers.get(header), (name, header)
