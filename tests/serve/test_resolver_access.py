"""Who may ask the resolver what: other hosts get signed blobs only, unless they send the
operator token (QPROXY_ADMIN_TOKEN); nginx on this host (loopback) gets everything."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from qproxy.config import Config
from qproxy.headers import signed_query
from qproxy.serve.resolver import Resolver

CONFIG = Config(s3_bucket="b", redis_url="redis://127.0.0.1:1/0", admin_token="op-token")


def ask(path: str, client: tuple[str, int], **headers: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=Resolver(CONFIG), client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
            return await http.get(path, headers=headers)

    return asyncio.run(go())


STRANGER = ("10.1.2.3", 40000)


@pytest.mark.parametrize(
    "path", ["/metrics", "/status/a/b.txt", "/resolve/a/b.txt", "/media/a/b.txt", "/auth"]
)
def test_other_hosts_get_nothing_but_blobs(path: str) -> None:
    assert ask(path, STRANGER).status_code == 403
    assert ask(path, STRANGER, **{"X-QProxy-Token": "wrong"}).status_code == 403


def test_the_operator_token_opens_the_service_routes() -> None:
    r = ask("/metrics", STRANGER, **{"X-QProxy-Token": "op-token"})
    assert r.status_code == 200 and "qproxy_resolve_total" in r.text


def test_loopback_and_unix_socket_clients_are_nginx() -> None:
    for client in (("127.0.0.1", 1), ("::1", 1), ("127.8.9.1", 1)):
        assert ask("/metrics", client).status_code == 200


def test_blobs_are_served_to_any_host_behind_their_signature() -> None:
    # Reaches the blob handler (an invalid key is its 404), and its signature check.
    assert ask("/internal/blob/.qp/x", STRANGER).status_code == 404
    r = ask("/internal/blob/a/b.txt?exp=1&v=1&sig=x", STRANGER)
    assert r.status_code == 403


def test_a_signed_blob_is_served_while_redis_is_down(tmp_path: Path) -> None:
    # Redis at a port nobody listens on: the signature alone vouches (for minutes at most).
    config = CONFIG.replace(local_root=str(tmp_path), secret="blob-secret")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.bin").write_bytes(b"the bytes")
    query = signed_query("blob-secret", "a/b.bin", version=1)

    async def go(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=Resolver(config), client=STRANGER)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
            return await http.get(path)

    r = asyncio.run(go(f"/internal/blob/a/b.bin?{query}"))
    assert r.status_code == 200 and r.content == b"the bytes"
    assert r.headers["content-type"] == "application/octet-stream"  # nothing known: safe
    assert asyncio.run(go(f"/internal/blob/a/b.bin?{query[:-2]}00")).status_code == 403
    assert asyncio.run(go(f"/internal/blob/a/none.bin?{query}")).status_code == 403
