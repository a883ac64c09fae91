"""Private files: served only with a signed, expiring URL for one method, in both nginx
modes, with nginx's micro-cache on (a cached answer must never reach an unsigned request)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from qproxy.headers import sign_url
from tests.conftest import _stack, needs_nginx, wait_state

pytestmark = [needs_nginx]


@pytest.fixture(scope="module", params=["x-accel", "auth_request"])
def site(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with _stack(mode=request.param, micro_cache=True, QPROXY_PRIVATE_PREFIXES="private/*") as stack:
        yield stack


def put(stack: Stack, key: str, data: bytes, tmp_path: object) -> None:
    path = f"{tmp_path}/{os.urandom(4).hex()}"
    with open(path, "wb") as fh:
        fh.write(data)
    subprocess.run(
        [sys.executable, "-m", "qproxy", "put", path, "--key", key, "--replace"],
        env={**os.environ, **stack.env},
        check=True,
        capture_output=True,
    )


def test_unsigned_requests_are_refused_and_signed_ones_served(
    site: Stack, tmp_path: object
) -> None:
    key = f"private/{os.urandom(6).hex()}.txt"
    put(site, key, b"for your eyes only", tmp_path)
    plain = f"{site.files_url}/media/{key}"
    for _ in range(3):  # never cached for an unsigned request, even after a signed one
        assert httpx.get(plain).status_code == 403
        signed = site.files_url + sign_url(key, 60, config=site.config)
        got = httpx.get(signed, follow_redirects=True)  # (S3's, if the worker was quick)
        assert got.status_code == 200 and got.content == b"for your eyes only"
    # The signature binds the method, the key and the expiry.
    head_url = site.files_url + sign_url(key, 60, method="HEAD", config=site.config)
    assert httpx.get(head_url).status_code == 403
    assert httpx.head(head_url).status_code in (200, 302)
    other = f"private/{os.urandom(6).hex()}.txt"
    put(site, other, b"another", tmp_path)
    query = sign_url(key, 60, config=site.config).split("?", 1)[1]
    assert httpx.get(f"{site.files_url}/media/{other}?{query}").status_code == 403
    tampered = signed[:-1] + ("0" if signed[-1] != "0" else "1")
    assert httpx.get(tampered).status_code == 403
    expiring = site.files_url + sign_url(key, 1, config=site.config)
    time.sleep(2.1)
    assert httpx.get(expiring).status_code == 403


def test_a_private_file_in_s3_gets_a_short_presigned_url(site: Stack, tmp_path: object) -> None:
    key = f"private/{os.urandom(6).hex()}.bin"
    put(site, key, b"remote secret", tmp_path)
    wait_state(Stores(site.config), key, "remote")
    assert httpx.get(f"{site.files_url}/media/{key}").status_code == 403
    got = httpx.get(site.files_url + sign_url(key, 60, config=site.config))
    assert got.status_code == 302
    expires = parse_qs(urlsplit(got.headers["location"]).query)["X-Amz-Expires"]
    assert int(expires[0]) <= 60
    assert got.headers["cache-control"] == "no-store"
    assert httpx.get(got.headers["location"]).content == b"remote secret"


def test_public_files_need_no_signature(site: Stack, tmp_path: object) -> None:
    key = f"open/{os.urandom(6).hex()}.txt"
    put(site, key, b"for everyone", tmp_path)
    got = httpx.get(f"{site.files_url}/media/{key}", follow_redirects=True)
    assert got.content == b"for everyone"
