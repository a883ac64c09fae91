"""End to end, as a browser would: through nginx to the app, the worker, S3 and back."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import httpx
import pytest
import redis

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from qproxy.worker.sweep import drop_local_copies
from tests.conftest import MAX_UPLOAD, needs_nginx
from tests.conftest import wait_state as wait_for_state


def upload(stack: Stack, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg") -> str:
    r = httpx.post(stack.front + "/upload", files={"file": (name, data, ctype)}, timeout=60)
    assert r.status_code == 201, r.text
    (key,) = r.json()["keys"]
    return str(key)


def wait_state(stack: Stack, key: str, want: str, timeout: float = 60) -> None:
    wait_for_state(Stores(stack.config), key, want, timeout)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (no client-side normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_phase(stack: Stack, key: str, data: bytes) -> None:
    url = f"{stack.files_url}/media/{key}"
    record = Stores(stack.config).state.get(key)
    assert record is not None and record.state in ("local", "queued")
    with httpx.Client(timeout=30) as client:
        # Local: nginx sends the file from disk.
        local = client.get(url)
        assert local.status_code == 200
        assert local.headers["x-qproxy-source"] == "local"
        assert sha(local.content) == sha(data)
        assert local.headers["content-type"] == "image/jpeg"
        assert 'filename="holiday photo.jpg"' in local.headers["content-disposition"]
        ranged = client.get(url, headers={"Range": "bytes=100-199"})
        assert ranged.status_code == 206
        assert ranged.content == data[100:200]
        head = client.head(url)
        assert head.status_code == 200
        assert int(head.headers["content-length"]) == len(data)


@needs_nginx
def test_round_trip(any_stack: Stack) -> None:
    stack = any_stack
    data = os.urandom(7 * 1024 * 1024 + 3)  # above the multipart threshold (6 MiB)
    # The worker is paused while the file is local, so the local phase is seen for sure.
    worker = stack.services["worker"]
    worker.signal(signal.SIGSTOP)
    try:
        key = upload(stack, data, "holiday photo.jpg")
        local_phase(stack, key, data)
    finally:
        worker.signal(signal.SIGCONT)
    url = f"{stack.files_url}/media/{key}"
    wait_state(stack, key, "remote")
    with httpx.Client(timeout=30) as client:
        # Remote: a 302 to S3, cacheable for less than the presigned URL lives.
        remote = client.get(url)
        assert remote.status_code == 302
        location = remote.headers["location"]
        assert location.startswith(stack.url("s3") + "/qproxy-dev/" + key)
        assert "X-Amz-Signature=" in location
        assert remote.headers["cache-control"] == "private, max-age=300"
        from_s3 = client.get(location)
        assert from_s3.status_code == 200
        assert sha(from_s3.content) == sha(data)
        # HEAD gets a URL presigned for HEAD (a GET signature would be refused by S3).
        head = client.head(url)
        assert head.status_code == 302
        assert client.head(head.headers["location"]).status_code == 200

    # What S3 holds, read back (moto does not verify checksums itself).
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    obj = s3.get_object(Bucket="qproxy-dev", Key=key)
    assert sha(obj["Body"].read()) == sha(data)
    assert obj["ContentType"] == "image/jpeg"
    assert obj["Metadata"]["sha256"] == sha(data)


def test_round_trip_small_file_standalone_or_nginx(stack: Stack) -> None:
    data = b"tiny file"
    key = upload(stack, data, "t.txt", "text/plain")
    r = httpx.get(
        f"{stack.files_url}/media/{key}", follow_redirects=True
    )  # local or already remote
    assert r.status_code == 200 and r.content == data
    wait_state(stack, key, "remote")
    r = httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True)
    assert r.content == data


def test_status_endpoint_and_cli(stack: Stack) -> None:
    key = upload(stack, b"status me", "s.txt", "text/plain")
    wait_state(stack, key, "remote")
    status = httpx.get(f"{stack.url('resolver')}/status/{key}").json()
    assert status["state"] == "remote"
    assert status["sha256"] == sha(b"status me")
    assert status["filename"] == "s.txt"
    env = {**os.environ, **stack.env}
    out = subprocess.run(
        [sys.executable, "-m", "qproxy", "status", key, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert '"state": "remote"' in out.stdout
    human = subprocess.run(
        [sys.executable, "-m", "qproxy", "status", key], capture_output=True, text=True, env=env
    )
    assert human.returncode == 0 and "remote" in human.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "qproxy", "status", "no/such.txt"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 1 and "no record for no/such.txt" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "qproxy", "status", "../x"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "dot-only segment" in bad.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "qproxy", "ls", "--state", "remote"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert key in listed.stdout


def test_healthz_and_metrics(stack: Stack) -> None:
    health = httpx.get(stack.url("resolver") + "/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "node": "node-1"}
    ready = httpx.get(stack.url("resolver") + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "degraded": [],
        "local": True,
        "redis": True,
        "s3": True,
        "draining": False,
        "node": "node-1",
    }
    metrics = httpx.get(stack.url("resolver") + "/metrics").text
    assert 'qproxy_resolve_total{decision="local"}' in metrics


def test_unknown_key_is_404(any_stack: Stack) -> None:
    r = httpx.get(f"{any_stack.files_url}/media/2026/01/01/nothing.txt")
    assert r.status_code == 404


HOSTILE = [
    "/media/../../etc/passwd",
    "/media/..%2f..%2fetc%2fpasswd",
    "/media/%2e%2e/%2e%2e/etc/passwd",
    "/media/a/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/media//etc/passwd",
    "/media/a%00b",
    "/media/.qp/journal/node-1.jsonl",
    "/media/%252e%252e/etc/passwd",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_paths_never_escape(any_stack: Stack, path: str) -> None:
    port = any_stack.ports["nginx" if any_stack.use_nginx else "resolver"]
    status, body = raw_get(port, path)
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body


@pytest.mark.parametrize(
    "path", [p.replace("/media/", "/resolve/", 1) for p in HOSTILE] + ["/status/..%2fx"]
)
def test_hostile_paths_at_the_resolver(stack: Stack, path: str) -> None:
    status, body = raw_get(stack.ports["resolver"], path)
    assert status in (400, 404), (status, body[:200])


@needs_nginx
def test_body_over_the_limit_is_413_at_nginx(stack: Stack) -> None:
    node = Stores(stack.config)
    before = set(node.local.pending_files())
    too_big = os.urandom(MAX_UPLOAD + 1024)
    r = httpx.post(stack.front + "/upload", files={"file": ("big.bin", too_big)}, timeout=60)
    assert r.status_code == 413

    def chunked() -> Iterator[bytes]:
        boundary = b"qpchunk"
        yield (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="c.bin"\r\n\r\n'
        )
        for i in range(0, len(too_big), 1024 * 1024):
            yield too_big[i : i + 1024 * 1024]
        yield b"\r\n--" + boundary + b"--\r\n"

    try:
        r = httpx.post(
            stack.front + "/upload",
            content=chunked(),
            headers={"Content-Type": "multipart/form-data; boundary=qpchunk"},
            timeout=60,
        )
        assert r.status_code == 413
    except httpx.HTTPError:
        pass  # nginx may close the connection while the client is still sending
    # The app saw part of the chunked body; the middleware must remove that partial file.
    deadline = time.monotonic() + 10
    while set(node.local.pending_files()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(node.local.pending_files()) - before == set()


def test_local_copy_dropped_only_after_keep_period(stack: Stack) -> None:
    node = Stores(stack.config)
    key = upload(stack, b"keep me a while", "k.txt", "text/plain")
    wait_state(stack, key, "remote")
    assert node.local.exists(key)  # keep period (an hour by default) not over yet
    assert drop_local_copies(node) == 0 or node.local.exists(key)
    drop_local_copies(node, now=time.time() + 3601)
    assert not node.local.exists(key)
    record = node.state.get(key)
    assert record is not None and record.state == "remote" and not record.has_local
    r = httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True)
    assert r.content == b"keep me a while"


def test_put_stores_a_file_like_an_upload(stack: Stack, tmp_path: os.PathLike[str]) -> None:
    source = os.path.join(tmp_path, "report 2026.pdf")
    data = os.urandom(100_000)
    with open(source, "wb") as fh:
        fh.write(data)
    env = {**os.environ, **stack.env}
    out = subprocess.run(
        [sys.executable, "-m", "qproxy", "put", source],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    key = out.stdout.strip()
    assert key.endswith(".pdf")
    wait_state(stack, key, "remote")
    record = Stores(stack.config).state.get(key)
    assert record is not None and record.filename == "report 2026.pdf"
    assert record.content_type == "application/pdf"
    served = httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True)
    assert sha(served.content) == sha(data)


def test_one_redis_round_trip_per_resolve(stack: Stack) -> None:
    key = upload(stack, b"count my queries", "q.txt", "text/plain")
    wait_state(stack, key, "remote")
    client = redis.Redis.from_url(stack.config.redis_url)
    seen: list[str] = []
    with client.monitor() as monitor:
        # MONITOR echoes every command the server runs; the request's lookups name the key.
        r = httpx.get(f"{stack.url('resolver')}/resolve/{key}")
        assert r.status_code == 302
        marker = "qp-monitor-end"
        client.get(marker)
        for event in monitor.listen():
            if marker in event["command"]:
                break
            if key in event["command"]:
                seen.append(event["command"])
    assert len(seen) == 1, seen
    assert seen[0].startswith("HGETALL")


def test_a_local_copy_gone_under_nginx_is_served_from_s3(any_stack: Stack) -> None:
    """The resolver said "local", the file vanished before nginx read it: ask again, get S3."""
    stack = any_stack
    node = Stores(stack.config)
    key = upload(stack, b"dropped under our feet", "d.txt", "text/plain")
    wait_state(stack, key, "remote")
    record = node.state.get(key)
    assert record is not None
    # The resolver's view is one step behind: the record still says queued, the local copy
    # is already gone (as when the janitor drops it between the answer and the read).
    node.state.transition(key, "queued", gen=record.gen)
    node.local.remove(key)
    r = httpx.get(f"{stack.files_url}/media/{key}")
    assert r.status_code == 302, r.text
    assert httpx.get(r.headers["location"]).content == b"dropped under our feet"
