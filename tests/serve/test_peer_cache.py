"""`qproxy nginx-config --peer-cache`: a file held by another web node, read again through
this node's nginx, comes from this node's copy (kept by the file's SHA-256), served as a
local file is (Range, HEAD, 304, the same safe headers), and only while the resolver says
the file is there: a deleted file or a newer version is never served from the cache.

Real nginx with the shipped config, in both modes, beside the session stacks; the other
node is a second resolver process with its own disk.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack, free_port
from qproxy.lifecycle.files import delete, store
from qproxy.ops.nginx import NginxOptions, full_config
from tests.conftest import needs_nginx, other_node, put_local, tmpfs

pytestmark = [
    needs_nginx,
    pytest.mark.skipif(os.geteuid() != 0, reason="the cache's own filesystem needs root"),
]


@pytest.fixture(params=[False, True], ids=["", "micro-cache"])
def cached(any_stack: Stack, request: pytest.FixtureRequest) -> Iterator[tuple[str, Stores, Stack]]:
    """This node's nginx with --peer-cache (in the stack's mode, with and without the
    micro-cache), and another node."""
    stack = any_stack
    name = f"nginx-peer-cache-{stack.mode}-{free_port()}"
    with tmpfs(stack.dir / name) as folder:
        options = NginxOptions(
            listen="127.0.0.1:{port}",
            app=stack.url("app"),
            resolver=stack.url("resolver"),
            mode=stack.mode,
            peer_cache=str(folder),
            micro_cache=request.param,
        )
        url = stack.add_nginx(name, full_config(stack.config, options))
        try:
            with other_node(stack) as node2:
                yield url, node2, stack
        finally:
            stack.services.pop(name).stop()


def test_a_file_read_again_comes_from_this_nodes_copy(
    cached: tuple[str, Stores, Stack],
) -> None:
    front, node2, stack = cached
    data = os.urandom(300_000)
    key = put_local(node2, data)
    url = f"{front}/media/{key}"
    first = httpx.get(url)
    assert first.status_code == 200 and first.content == data
    assert first.headers["x-qproxy-source"] == "peer"
    assert first.headers["x-qproxy-cache"] == "MISS"
    # The other node stops answering: the copy here is what serves it now.
    peer = stack.services[next(n for n in stack.services if n.startswith("resolver-node2"))]
    peer.signal(signal.SIGSTOP)
    try:
        again = httpx.get(url, timeout=5)
        assert again.status_code == 200 and again.content == data
        assert again.headers["x-qproxy-cache"] == "HIT"
        # As a local file is served: Range, HEAD, 304; the same validators.
        part = httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=5)
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        head = httpx.head(url, timeout=5)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        assert again.headers["etag"] == first.headers["etag"]
        fresh = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=5)
        assert fresh.status_code == 304
        for answer in (again, part):
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"].endswith("sandbox")
    finally:
        peer.signal(signal.SIGCONT)


def test_active_content_from_the_cache_is_still_an_attachment(
    cached: tuple[str, Stores, Stack],
) -> None:
    front, node2, _ = cached
    page = "peer-cache/page.html"
    store(node2, [b"<script>alert(1)</script>"], page,
          {"filename": "page.html", "content_type": "text/html"}, replace=True)  # fmt: skip
    for expected in ("MISS", "HIT"):
        html = httpx.get(f"{front}/media/{page}")
        assert html.headers["x-qproxy-cache"] == expected
        assert html.content == b"<script>alert(1)</script>"
        assert html.headers["content-type"] == "application/octet-stream"
        assert html.headers["content-disposition"].startswith("attachment")
        assert html.headers["content-security-policy"].endswith("sandbox")


def test_a_deleted_file_or_a_new_version_is_never_served_from_the_cache(
    cached: tuple[str, Stores, Stack], request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["cached"]:
        pytest.skip("with --micro-cache a deleted file may be served ~1 s more, by design")
    front, node2, _ = cached
    gone = put_local(node2, b"deleted soon")
    replaced = put_local(node2, b"version one")
    for key in (gone, replaced):
        for expected in ("MISS", "HIT"):
            assert httpx.get(f"{front}/media/{key}").headers["x-qproxy-cache"] == expected
    assert delete(node2, gone)
    assert node2.local.exists(gone)  # (its bytes are still on both disks)
    assert httpx.get(f"{front}/media/{gone}").status_code == 404
    put_local(node2, b"version two", key=replaced, replace=True)
    served = httpx.get(f"{front}/media/{replaced}")
    assert served.content == b"version two"
    assert served.headers["x-qproxy-cache"] == "MISS"


def test_a_big_file_is_not_kept(cached: tuple[str, Stores, Stack]) -> None:
    front, node2, _ = cached
    data = os.urandom(10 * 1000 * 1000)  # 10 MB: the first size left out
    key = put_local(node2, data)
    for _ in range(2):
        served = httpx.get(f"{front}/media/{key}", timeout=30)
        assert served.content == data
        assert served.headers["x-qproxy-cache"] == "MISS"
