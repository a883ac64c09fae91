"""Presigned redirects against an S3 that checks them (s3rver; moto accepts any URL).

The URLs come from ``RemoteStore.url``, what the resolver puts in its 302s. ``make test``
installs s3rver (npm) into .cache/s3rver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import boto3
import botocore.config
import httpx
import pytest

from qproxy.config import Config
from qproxy.dev.devstack import free_port
from qproxy.stores.s3 import RemoteStore

ROOT = Path(__file__).resolve().parents[2]
S3RVER = ROOT / ".cache" / "s3rver" / "node_modules" / ".bin" / "s3rver"
BUCKET = "qproxy-presign"
DATA = os.urandom(70_001)


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not S3RVER.exists():
        pytest.fail(f"{S3RVER} is missing: `make test` installs it (npm install s3rver)")
    port = free_port()
    data = tmp_path_factory.mktemp("s3rver")
    argv = [str(S3RVER), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent"]
    proc = subprocess.Popen([*argv, "--configure-bucket", BUCKET])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, "s3rver exited"
                assert time.monotonic() < deadline, "s3rver did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def store(s3rver: str, monkeypatch: pytest.MonkeyPatch) -> RemoteStore:
    # s3rver's one account; a request signed with any other key is refused.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
    client = boto3.session.Session().client(  # not boto3's default session: it keeps
        "s3",  # the credentials it saw first (another test's)
        endpoint_url=s3rver,
        region_name="us-east-1",
        aws_access_key_id="S3RVER",
        aws_secret_access_key="S3RVER",
        config=botocore.config.Config(
            request_checksum_calculation="when_required", s3={"addressing_style": "path"}
        ),
    )
    client.put_object(Bucket=BUCKET, Key="docs/a file.bin", Body=DATA)
    config = Config(
        s3_bucket=BUCKET, s3_endpoint_url=s3rver, presign_expires=2, secret="s", node_id="n"
    )
    return RemoteStore(config)


def test_presigned_get_and_head_are_accepted(store: RemoteStore) -> None:
    got = httpx.get(store.url("docs/a file.bin"))
    assert got.status_code == 200 and got.content == DATA
    head = httpx.head(store.url("docs/a file.bin", method="HEAD"))
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(DATA))


def test_a_url_signed_with_another_key_id_is_refused(store: RemoteStore) -> None:
    # What s3rver 3 checks of a SigV4 query signature (measured): the access key id and the
    # expiry. It takes a URL with a zeroed signature, one for another object key, one
    # signed with a wrong secret, and a HEAD on a GET URL - all of which S3 refuses.
    url = store.url("docs/a file.bin")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["X-Amz-Credential"] = query["X-Amz-Credential"].replace("S3RVER", "SOMEONE")
    assert httpx.get(urlunsplit(parts._replace(query=urlencode(query)))).status_code == 403


def test_an_expired_url_is_refused_and_a_new_one_works(store: RemoteStore) -> None:
    url = store.url("docs/a file.bin")
    assert httpx.get(url).status_code == 200
    time.sleep(3.1)  # presign_expires=2
    assert httpx.get(url).status_code == 403
    fresh = store.url("docs/a file.bin")  # not the cached one: that one has expired
    assert fresh != url
    assert httpx.get(fresh).status_code == 200
