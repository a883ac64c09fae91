"""Resolver behaviour beyond the happy path: public mode, peers, signed blobs, Redis down."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from qproxy import logs
from qproxy.compose import Stores
from qproxy.dev.devstack import Stack, free_port
from qproxy.headers import signed_query
from qproxy.keys import generate_key
from qproxy.lifecycle.files import delete, store
from qproxy.ops.nginx import NginxOptions, full_config
from qproxy.worker.sweep import drop_local_copies
from qproxy.worker.transfer import transfer
from tests.conftest import RESOLVER, NoQueue, lone_node, other_node, put_local, serving


def client_for(stack: Stack, **env: str) -> Iterator[httpx.Client]:
    """A real resolver process (uvicorn) on the stack, with some settings changed."""
    with (
        serving(stack, f"resolver-{free_port()}", RESOLVER, "/metrics", env) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def test_public_mode_redirects_to_the_base_url(stack: Stack, quiet_node: Stores) -> None:
    key = put_local(quiet_node, b"public bytes")
    assert transfer(quiet_node, key) == "remote"
    env = {"QPROXY_REDIRECT": "public", "QPROXY_REMOTE_BASE_URL": "https://cdn.example.com/files/"}
    for client in client_for(stack, **env):
        r = client.get(f"/resolve/{key}")
        assert r.status_code == 302
        assert r.headers["location"] == f"https://cdn.example.com/files/{key}"
        head = client.head(f"/resolve/{key}")
        assert head.headers["location"] == f"https://cdn.example.com/files/{key}"


def test_keep_local_zero_still_has_a_grace_period(quiet_node: Stores) -> None:
    node = Stores(quiet_node.config.replace(keep_local_seconds=0), queue=NoQueue())
    key = put_local(node, b"drop me soon")
    assert transfer(node, key) == "remote"
    # In-flight reads of the local copy get drop_grace_seconds (5 s) to finish.
    drop_local_copies(node)
    assert node.local.exists(key)
    drop_local_copies(node, now=time.time() + node.config.drop_grace_seconds + 1)
    assert not node.local.exists(key)


def test_redis_down_serves_local_files_then_s3(stack: Stack, quiet_node: Stores) -> None:
    local_key = put_local(quiet_node, b"on disk")
    remote_key = put_local(quiet_node, b"in s3")
    assert transfer(quiet_node, remote_key) == "remote"
    quiet_node.local.remove(remote_key)
    for client in client_for(stack, QPROXY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
        r = client.get(f"/resolve/{local_key}")
        assert r.status_code == 200
        assert r.headers["x-accel-redirect"] == f"/_qp/local/{local_key}"
        r = client.get(f"/resolve/{remote_key}")
        assert r.status_code == 302
        assert httpx.get(r.headers["location"]).content == b"in s3"
        assert client.get("/resolve/2026/01/01/none.txt").status_code == 404
        # Still serving (from disk, then S3): alive, ready, Redis reported as degraded.
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["degraded"] == ["redis"]


def test_redis_down_is_a_log_line_every_few_seconds_not_one_a_request(
    stack: Stack, quiet_node: Stores
) -> None:
    key = put_local(quiet_node, b"on disk")
    name = f"resolver-{free_port()}"
    env = {"QPROXY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with serving(stack, name, RESOLVER, "/metrics", env) as url:
        started = time.monotonic()
        for _ in range(40):
            assert httpx.get(f"{url}/resolve/{key}").status_code == 200
        took = time.monotonic() - started
        log = stack.services[name].log_path.read_text()
    said = log.count("resolver: Redis unavailable")
    assert 1 <= said <= 1 + took // 10, log[-2000:]  # a line at most every 10 s


def test_a_throttled_warning_says_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    warn = logs.Throttled(logging.getLogger("qproxy.test"), every=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="qproxy.test"):
        for _ in range(5):
            warn.warning("Redis away (%s)", "refused")
            now[0] += 1
        now[0] = 110.0
        warn.warning("Redis away (%s)", "refused")
        warn.warning("Redis away (%s)", "refused")
    assert [r.getMessage() for r in caplog.records] == [
        "Redis away (refused)",
        "Redis away (refused) (4 more like it in the last 10 s)",
    ]


def test_blob_urls_are_signed_and_expire(stack: Stack, quiet_node: Stores) -> None:
    key = put_local(quiet_node, b"peer bytes")
    secret = quiet_node.config.secret
    for client in client_for(stack):
        good = client.get(f"/internal/blob/{key}?{signed_query(secret, key)}")
        assert good.status_code == 200 and good.content == b"peer bytes"
        other = generate_key("x.txt")
        assert client.get(f"/internal/blob/{key}?{signed_query(secret, other)}").status_code == 403
        assert client.get(f"/internal/blob/{key}?{signed_query('wrong', key)}").status_code == 403
        assert (
            client.get(f"/internal/blob/{key}?{signed_query(secret, key, ttl=-5)}").status_code
            == 403
        )
        assert client.get(f"/internal/blob/{key}").status_code == 403
        assert client.get("/internal/blob/..%2Fx?exp=1&sig=x").status_code == 404


def test_a_blob_url_is_revoked_by_a_delete_or_a_newer_upload(stack: Stack, tmp_path: Path) -> None:
    quiet_node, env = lone_node(stack, tmp_path)  # a janitor of its own, quiet after start
    secret = quiet_node.config.secret
    gone = put_local(quiet_node, b"deleted soon")
    replaced = put_local(quiet_node, b"version one")
    for client in client_for(stack, **env):
        gone_url = f"/internal/blob/{gone}?{signed_query(secret, gone)}"
        assert client.get(gone_url).status_code == 200
        assert delete(quiet_node, gone)
        # The local copy is still there (the janitor drops it later): the URL is dead now.
        assert quiet_node.local.exists(gone)
        assert client.get(gone_url).status_code == 404
        v1_url = f"/internal/blob/{replaced}?{signed_query(secret, replaced, version=1)}"
        assert client.get(v1_url).status_code == 200
        put_local(quiet_node, b"version two", key=replaced, replace=True)
        assert quiet_node.state.get(replaced).version == 2  # type: ignore[union-attr]
        assert client.get(v1_url).status_code == 404
        v2_url = f"/internal/blob/{replaced}?{signed_query(secret, replaced, version=2)}"
        assert client.get(v2_url).content == b"version two"


@pytest.mark.parametrize("node_url", ["resolver", "nginx"])
def test_a_file_on_another_node_is_proxied_through_nginx(any_stack: Stack, node_url: str) -> None:
    stack = any_stack
    quiet_node = Stores(stack.config, queue=NoQueue())
    # A second node: its own disk and resolver (and nginx); its record points at one.
    with other_node(stack, via_nginx=node_url == "nginx") as node2:
        port = urlsplit(node2.config.node_url).port
        key = put_local(node2, b"bytes living on node 2")
        page, image = page_and_image(node2, b"<script>alert(1)</script>", "text/html")
        # Node 1's resolver says "peer"; node 1's nginx proxies from node 2's blob endpoint.
        if stack.mode == "x-accel":
            decision = httpx.get(f"{stack.url('resolver')}/resolve/{key}")
            target = decision.headers["x-accel-redirect"]
        else:
            original = {"X-Original-URI": f"/media/{key}"}
            target = httpx.get(f"{stack.url('resolver')}/auth", headers=original).headers[
                "x-qp-peer"
            ]
        assert target.startswith(f"/_qp/peer/127.0.0.1:{port}/{key}?")
        assert "sig" in parse_qs(urlsplit(target).query)
        served = httpx.get(f"{stack.files_url}/media/{key}")
        assert served.status_code == 200
        assert served.content == b"bytes living on node 2"
        assert served.headers["x-qproxy-source"] == "peer"
        # Shown from a peer as from this node's disk: active types as attachments.
        html = httpx.get(f"{stack.files_url}/media/{page}")
        assert html.content == b"<script>alert(1)</script>"
        assert html.headers["content-type"] == "application/octet-stream"
        assert html.headers["content-disposition"].startswith("attachment")
        png = httpx.get(f"{stack.files_url}/media/{image}")
        assert png.headers["content-type"] == "image/png"
        assert png.headers["content-disposition"].startswith("inline")
        for answer in (served, html, png):
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"].endswith("sandbox")
        # A worker on node 1 pulls the file from node 2 over HTTP to move it to S3.
        assert not quiet_node.local.exists(key)
        assert transfer(quiet_node, key) == "remote"
        assert httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True).content == (
            b"bytes living on node 2"
        )


def test_a_nodes_nginx_sends_its_files_to_the_others(stack: Stack) -> None:
    """QPROXY_NODE_URL at a node's nginx: its resolver checks each signed URL and its nginx
    sends the file, as it does a local one (type, Range, HEAD, 304), revoked as the
    resolver revokes, never through a link, and its internal location closed to clients."""
    with other_node(stack, via_nginx=True) as node2:
        base, secret = node2.config.node_url, node2.config.secret
        data = os.urandom(200_000)
        key = put_local(node2, data)
        url = f"{base}/internal/blob/{key}?{signed_query(secret, key)}"
        got = httpx.get(url)
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"].startswith("attachment")
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-security-policy"].endswith("sandbox")
        assert "x-accel-redirect" not in got.headers
        part = httpx.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        head = httpx.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        again = httpx.get(url, headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert httpx.get(f"{base}/internal/blob/{key}").status_code == 403
        assert httpx.get(f"{base}/_qp/blob/{key}").status_code == 404
        # A link where a file was: not followed, though the URL is signed and the record
        # live (nginx refuses it, 403, as it does a link behind a local file).
        linked = put_local(node2, b"replaced by a link")
        path = node2.local.path_for(linked)
        path.unlink()
        path.symlink_to(node2.local.path_for(key))
        linked_url = f"{base}/internal/blob/{linked}?{signed_query(secret, linked)}"
        refused = httpx.get(linked_url)
        assert refused.status_code == 403 and data not in refused.content
        assert delete(node2, key)
        assert node2.local.exists(key)  # (the janitor drops it later)
        assert httpx.get(url).status_code == 404


def connections_to(port: int) -> set[str]:
    """This host's TCP sockets toward ``port`` (open or closing: TIME_WAIT too), by their
    own address: each is a connection made to it."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, remote = line.split()[1:3]
                if int(remote.rsplit(":", 1)[1], 16) == port:
                    found.add(local)
    return found


def test_reads_from_a_named_peer_reuse_their_connections(any_stack: Stack) -> None:
    """`qproxy nginx-config --peer NODE_URL`: nginx keeps its connections to that node open,
    so many reads of files held there open about one connection (one per nginx worker),
    not one each (a handshake per read, and a closed socket left behind on this host)."""
    stack = any_stack
    with other_node(stack, via_nginx=True) as node2:
        port = urlsplit(node2.config.node_url).port
        assert port is not None
        options = NginxOptions(
            listen="127.0.0.1:{port}",
            app=stack.url("app"),
            resolver=stack.url("resolver"),
            mode=stack.mode,
            peers=(node2.config.node_url,),
        )
        name = f"nginx-peers-{stack.mode}-{free_port()}"
        front = stack.add_nginx(name, full_config(stack.config, options))
        try:
            data = os.urandom(100_000)
            key = put_local(node2, data)
            before = connections_to(port)
            with httpx.Client(base_url=front, timeout=30) as client:
                for _ in range(20):
                    got = client.get(f"/media/{key}")
                    assert got.status_code == 200 and got.content == data
                    assert got.headers["x-qproxy-source"] == "peer"
            opened = connections_to(port) - before
            assert 1 <= len(opened) <= 2, opened  # without --peer: 20
        finally:
            stack.services.pop(name).stop()


def page_and_image(node: Stores, active: bytes, active_type: str) -> tuple[str, str]:
    """Two stored files: active content (a browser would run it), and a PNG."""
    page, image = generate_key("page.html"), generate_key("cat.png")
    store(node, [active], page, {"filename": "page.html", "content_type": active_type})
    store(node, [b"\x89PNG"], image, {"filename": "cat.png", "content_type": "image/png"})
    return page, image


def test_standalone_mode_shows_files_safely(stack: Stack, quiet_node: Stores) -> None:
    page, image = page_and_image(quiet_node, b"<svg onload=alert(1)>", "image/svg+xml")
    for client in client_for(stack, QPROXY_STANDALONE="1"):
        svg = client.get(f"/media/{page}")
        assert svg.content == b"<svg onload=alert(1)>"
        assert svg.headers["content-type"] == "application/octet-stream"
        assert svg.headers["content-disposition"].startswith("attachment")
        png = client.get(f"/media/{image}")
        assert png.headers["content-type"] == "image/png"
        for answer in (svg, png):
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"].endswith("sandbox")


def test_public_path_at_the_root_leaves_the_service_routes_alone(
    stack: Stack, quiet_node: Stores
) -> None:
    key = put_local(quiet_node, b"root public path")
    for standalone in ("0", "1"):
        for client in client_for(stack, QPROXY_PUBLIC_PATH="/", QPROXY_STANDALONE=standalone):
            assert client.get("/readyz").json()["redis"] is True
            assert "qproxy_resolve_total" in client.get("/metrics").text
            assert client.get(f"/status/{key}").json()["key"] == key
            r = client.get(f"/{key}")
            assert r.status_code == 200
            if standalone == "1":
                assert r.content == b"root public path"
            else:
                assert r.headers["x-accel-redirect"] == f"/_qp/local/{key}"


def _hot_then_changed(quiet_node: Stores, client: httpx.Client, within: float) -> None:
    """Hot files, deleted or replaced by another process: the change is seen by the first
    request after it (``within`` 0) or by one within ``within`` seconds."""

    def seen(path: str, check: Callable[[httpx.Response], bool]) -> None:
        deadline = time.monotonic() + within
        while not check(client.get(path)):
            assert time.monotonic() < deadline, f"{path}: the change was not seen in {within} s"
            time.sleep(0.01)

    for i in range(20):
        gone = put_local(quiet_node, b"deleted soon %d" % i)
        replaced = put_local(quiet_node, b"version one %d" % i)
        for _ in range(5):  # hot
            assert client.get(f"/media/{gone}").status_code == 200
            assert client.get(f"/media/{replaced}").content == b"version one %d" % i
        assert delete(quiet_node, gone)
        seen(f"/media/{gone}", lambda r: r.status_code == 404)
        put_local(quiet_node, b"version two %d" % i, key=replaced, replace=True)
        seen(f"/media/{replaced}", lambda r, i=i: r.content == b"version two %d" % i)


def test_a_hot_file_deleted_or_replaced_is_seen_so_by_the_next_request(
    any_stack: Stack,
) -> None:
    """By default every request asks Redis: the very next request after a change gets it."""
    with httpx.Client(base_url=any_stack.files_url, timeout=30) as client:
        _hot_then_changed(Stores(any_stack.config, queue=NoQueue()), client, within=0)


def test_with_the_record_cache_a_change_is_seen_within_its_bound(stack: Stack) -> None:
    """QPROXY_RECORD_CACHE: records are remembered until Redis's invalidation says they
    changed, seen once it arrives (on a busy host Redis may send it some ms after the
    writer's answer): well within 1 s, where a remembered record would live 5 s."""
    for client in client_for(stack, QPROXY_RECORD_CACHE="1", QPROXY_STANDALONE="1"):
        _hot_then_changed(Stores(stack.config, queue=NoQueue()), client, within=1)


def test_with_the_record_cache_a_kept_answer_follows_its_record(
    stack: Stack, quiet_node: Stores
) -> None:
    """With QPROXY_RECORD_CACHE the resolver keeps each answer it made (a hot key costs no
    new decision): the moment its record cache sees a change (lookup() answers the new
    way), both modes' answers are the new ones too, not a kept one (X-Accel's /resolve/,
    auth_request's /auth)."""
    import asyncio
    import dataclasses

    from qproxy.serve.resolver import Resolver

    key = put_local(quiet_node, b"version one")
    assert transfer(quiet_node, key) == "remote"
    app = Resolver(dataclasses.replace(stack.config, record_cache=True))

    async def go() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:

            async def answers() -> tuple[tuple[int, str], tuple[int, str]]:
                xa = await http.get(f"/resolve/{key}")
                auth = await http.get("/auth", headers={"X-Original-URI": f"/media/{key}"})
                return (
                    (xa.status_code, xa.headers.get("location", "")),
                    (auth.status_code, auth.headers.get("x-qp-location", "")),
                )

            async def changed_to(kind: str, url_part: str) -> None:
                for _ in range(1000):  # until the record cache has the change
                    decision = await app.lookup(key)
                    if decision.kind == kind and url_part in decision.url:
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError(f"the record cache never saw {key} {kind}")
                (xa_status, xa_url), (auth_status, auth_url) = await answers()
                if kind == "redirect":
                    assert xa_status == 302 and url_part in xa_url
                    assert auth_status == 200 and url_part in auth_url
                else:  # auth_request's miss: a 200 that names nothing to serve
                    assert (xa_status, xa_url, auth_status, auth_url) == (404, "", 200, "")

            for _ in range(5):  # hot: answers kept
                (status, url), _auth = await answers()
                assert status == 302 and f"/{key}?" in url
            async with httpx.AsyncClient() as s3:
                assert (await s3.get(url)).content == b"version one"
            put_local(quiet_node, b"version two", key=key, replace=True)
            assert transfer(quiet_node, key) == "remote"
            await changed_to("redirect", f"/{key}~v2?")
            assert delete(quiet_node, key)
            await changed_to("missing", "")

    async def run() -> None:
        try:
            await go()
        finally:
            await app.reader.redis.close()

    asyncio.run(run())
