"""Many hosts for real: two web nodes, a worker host, Redis and S3 on a fifth, a client on a
sixth, each a network namespace on a private switch (tests/cluster/net.py), each node's
files invisible to the others (tests/cluster/cluster.py). Node URLs are host names.

Skipped, with the reason, only where namespaces cannot be made (not root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from tusclient import client as tus_client

from qproxy.core.record import FileRecord
from tests.cluster.cluster import Cluster, Node, cluster
from tests.cluster.net import can_make_namespaces, network

WHY_NOT = can_make_namespaces()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


@pytest.fixture(scope="module")
def site() -> Iterator[Cluster]:
    with network() as net, cluster(net) as made:
        made.start_data()
        web1 = made.add_node("web1", 11)
        web2 = made.add_node("web2", 12)
        web3 = made.add_node("web3", 15)
        for node in (web1, web2):
            made.start_node(node)
        made.start_node(web3, mode="auth_request")  # nginx's other mode
        made.start_worker()
        yield made


def record(site: Cluster, key: str) -> FileRecord | None:
    stores = site.stores()
    return site.client.run(stores.state.get, key)


def wait_for(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def upload(site: Cluster, node: Node, data: bytes, name: str = "f.bin") -> str:
    def post() -> httpx.Response:
        return httpx.post(f"{node.front}/upload", files={"file": (name, data)}, timeout=60)

    answer = site.client.run(post)
    assert answer.status_code == 201, answer.text
    (key,) = answer.json()["keys"]
    return str(key)


def get(site: Cluster, url: str, **kwargs: Any) -> httpx.Response:
    return site.client.run(
        lambda: httpx.request(kwargs.pop("method", "GET"), url, timeout=60, **kwargs)
    )


def worker_paused(site: Cluster) -> Any:
    """Files stay local while the worker host's worker is stopped (SIGSTOP)."""

    class Paused:
        def __enter__(self) -> None:
            site.services["work"].signal(signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            site.services["work"].signal(signal.SIGCONT)

    return Paused()


@pytest.mark.parametrize("serving", ["web2", "web3"])
def test_a_file_on_another_node_is_served_as_a_local_one(site: Cluster, serving: str) -> None:
    # web2's nginx runs in X-Accel mode, web3's in auth_request mode.
    web1, web2 = site.nodes["web1"], site.nodes[serving]
    data = os.urandom(3 * 1024 * 1024 + 17)
    with worker_paused(site):
        key = upload(site, web1, data, "movie.mp4")
        assert (web1.files / key).exists() and not (web2.files / key).exists()
        url = f"{web2.front}/media/{key}"
        whole = get(site, url)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["x-qproxy-source"] == "peer"
        # Range, as from the node that has it.
        part = get(site, url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        tail = get(site, url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        # HEAD: the headers, no body.
        head = get(site, url, method="HEAD")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(data)
        # A copy the client has: 304, by ETag and by date.
        etag = whole.headers["etag"]
        assert get(site, url, headers={"If-None-Match": etag}).status_code == 304
        since = whole.headers["last-modified"]
        assert get(site, url, headers={"If-Modified-Since": since}).status_code == 304
        assert get(site, url, headers={"If-None-Match": '"other"'}).status_code == 200
        # The same ETag as the node that has it serves (one file, one validator).
        local = get(site, f"{web1.front}/media/{key}", method="HEAD")
        assert local.headers["etag"] == etag
    # Streamed through, never spooled to the serving node's disk.
    log = (site.base / f"{serving}-nginx" / "error.log").read_text()
    assert "buffered to a temporary file" not in log, log[-2000:]
    # The worker host has none of web1's files, yet the transfer works: it pulled it.
    wait_for(lambda: (r := record(site, key)) is not None and r.state == "remote")
    assert not any((site.base / "work-files").iterdir())
    served = get(site, f"{web2.front}/media/{key}", follow_redirects=True)
    assert served.content == data


def test_doctor_catches_a_node_url_peers_cannot_reach(site: Cluster) -> None:
    web1 = site.nodes["web1"]

    def doctor(*checks: str, **env: str) -> dict[str, dict[str, str]]:
        wanted = [f"--check={c}" for c in checks or ("node-url", "tus-url")]
        done = site.qproxy(web1, "doctor", "--json", *wanted, **env)
        return {c["name"]: c for c in json.loads(done.stdout)}

    good = doctor()["node url"]
    assert good["level"] == "ok" and "reachable" in good["detail"], good
    # The single-host default on a cluster: the other nodes cannot fetch from it.
    loop = doctor("node-url", QPROXY_NODE_URL="http://127.0.0.1:8300")["node url"]
    assert loop["level"] == "fail" and "loopback" in loop["detail"] and "web2" in loop["detail"]
    # A URL nothing answers at.
    dead = doctor("node-url", QPROXY_NODE_URL="http://web1:8399")["node url"]
    assert dead["level"] == "fail" and "cannot reach" in dead["detail"], dead
    # Where the other nodes send on tus requests for this node's uploads.
    assert doctor()["tus url"]["level"] == "ok"
    tus_dead = doctor("tus-url", QPROXY_NODE_TUS_URL="http://web1:8399")["tus url"]
    assert tus_dead["level"] == "fail" and "QPROXY_NODE_TUS_URL" in tus_dead["detail"]
    tus_loop = doctor("tus-url", QPROXY_NODE_TUS_URL="http://127.0.0.1:8080")["tus url"]
    assert tus_loop["level"] == "fail" and "loopback" in tus_loop["detail"]
    not_tus = doctor("tus-url", QPROXY_NODE_TUS_URL="http://web1:8300")["tus url"]  # resolver
    assert not_tus["level"] == "fail" and "Tus-Version" in not_tus["detail"], not_tus


def test_an_origin_that_does_not_answer(site: Cluster) -> None:
    web1, web2 = site.nodes["web1"], site.nodes["web2"]
    data = os.urandom(200_000)
    with worker_paused(site):
        key = upload(site, web1, data)
        url = f"{web2.front}/media/{key}"
        resolver = site.services["web1-resolver"]
        resolver.signal(signal.SIGSTOP)  # hung: connections open, no byte comes
        try:
            started = time.monotonic()
            hung = get(site, url)
            waited = time.monotonic() - started
        finally:
            resolver.signal(signal.SIGCONT)
    assert hung.status_code == 503 and hung.headers["retry-after"].isdigit()
    assert waited < 30, waited  # nginx's default would be 60 s
    # Cut off (no answer at all): 503 after the connect timeout, and the worker keeps
    # retrying rather than marking the file failed (QPROXY_TRANSFER_RETRIES is 2 here).
    with worker_paused(site):
        key2 = upload(site, web1, data)
        web1.host.cut()
    try:
        down = get(site, f"{web2.front}/media/{key2}")
        assert down.status_code == 503 and "retry-after" in down.headers
        wait_for(lambda: (r := record(site, key2)) is not None and r.attempts >= 4, timeout=90)
        now = record(site, key2)
        assert now is not None and now.state != "failed", now
    finally:
        web1.host.plug()
    wait_for(lambda: (r := record(site, key2)) is not None and r.state == "remote", timeout=90)
    wait_for(lambda: (r := record(site, key)) is not None and r.state == "remote", timeout=90)


V = {"Tus-Resumable": "1.0.0"}


def tus_key(site: Cluster, upload_url: str) -> str:
    """The key the app of the upload's node was handed when it completed."""
    upload_id = upload_url.rstrip("/").rsplit("/", 1)[-1]
    for line in (site.base / "tus-completed.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["upload"] == upload_id:
            return str(entry["keys"][0])
    raise AssertionError(f"{upload_id} never completed")


def test_a_tus_upload_goes_on_through_any_node(site: Cluster, tmp_path: Path) -> None:
    # tuspy starts on web1; the client's next requests reach web2 (X-Accel mode) and web3
    # (auth_request mode), which send them on to web1, whose disk holds the partial file.
    web1, web2, web3 = (site.nodes[n] for n in ("web1", "web2", "web3"))
    data = os.urandom(3 * 1024 * 1024 + 99)
    source = tmp_path / "trip.mov"
    source.write_bytes(data)
    chunk = 1024 * 1024

    def start() -> str:
        with open(source, "rb") as stream:
            uploader = tus_client.TusClient(f"{web1.front}/tus/").uploader(
                file_stream=stream, chunk_size=chunk, metadata={"filename": "trip.mov"}
            )
            uploader.upload_chunk()
            return str(uploader.url)

    def resume(front: str, path: str, chunks: int | None) -> int:
        with open(source, "rb") as stream:
            uploader = tus_client.TusClient(f"{front}/tus/").uploader(
                file_stream=stream, url=f"{front}{path}", chunk_size=chunk
            )
            if chunks is None:
                uploader.upload()
            for _ in range(chunks or 0):
                uploader.upload_chunk()
            return int(uploader.offset)

    path = urlsplit(site.client.run(start)).path
    assert path.startswith("/tus/web1.")
    assert site.client.run(resume, web2.front, path, 1) == 2 * chunk  # HEAD, PATCH via web2
    assert site.client.run(resume, web3.front, path, None) == len(data)  # and via web3
    key = tus_key(site, path)
    wait_for(lambda: (r := record(site, key)) is not None and r.state == "remote")
    now = record(site, key)
    assert now is not None and now.node == "web1" and now.size == len(data)
    assert now.sha256 == hashlib.sha256(data).hexdigest()
    assert get(site, f"{web2.front}/media/{key}", follow_redirects=True).content == data
    # Only web1 ever held its bytes.
    for other in (web2, web3):
        assert not list(other.files.rglob(path.rsplit("/", 1)[-1] + "*"))
    # A concatenation goes to its first part's node, which must hold every part.
    parts = []
    for node in (web1, web2):
        made = get(
            site,
            f"{node.front}/tus/",
            method="POST",
            content=b"part",
            headers={**V, "Upload-Length": "4", "Upload-Concat": "partial",
                     "Content-Type": "application/offset+octet-stream"},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        parts.append(urlsplit(made.headers["location"]).path)
    final = get(
        site,
        f"{web3.front}/tus/",
        method="POST",
        headers={**V, "Upload-Concat": "final;" + " ".join(parts)},
    )
    assert final.status_code == 400 and "another node" in final.text, final.text


def test_a_tus_upload_whose_node_is_cut_off_waits_for_it(site: Cluster) -> None:
    web1, web2 = site.nodes["web1"], site.nodes["web2"]
    created = get(site, f"{web1.front}/tus/", method="POST", headers={**V, "Upload-Length": "10"})
    assert created.status_code == 201, created.text
    path = urlsplit(created.headers["location"]).path
    web1.host.cut()
    try:
        # Not a 404 (tus clients would start again from zero): 503 and when to try again.
        down = get(site, f"{web2.front}{path}", method="HEAD", headers=V)
        assert down.status_code == 503, down.status_code
        assert down.headers["retry-after"].isdigit()
        assert down.headers["tus-resumable"] == "1.0.0"
    finally:
        web1.host.plug()
    patched = get(
        site,
        f"{web2.front}{path}",
        method="PATCH",
        content=b"0123456789",
        headers={**V, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert patched.status_code == 204 and patched.headers["upload-offset"] == "10"


def test_nodes_register_and_a_draining_node_empties_itself(site: Cluster) -> None:
    web1, web2 = site.nodes["web1"], site.nodes["web2"]

    def listed() -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in json.loads(site.qproxy(web2, "nodes", "--json").stdout)}

    nodes = listed()
    assert nodes["web1"]["url"] == "http://web1:8300" and not nodes["web1"]["gone"]
    assert nodes["web2"]["url"] == "http://web2:8300"
    text = site.qproxy(web2, "nodes").stdout
    assert re.search(r"^web1 +http://web1:8300 +\d+s +up$", text, re.M), text
    # A resumable upload web2 holds, half sent.
    created = get(site, f"{web2.front}/tus/", method="POST", headers={**V, "Upload-Length": "10"})
    tus_path = urlsplit(created.headers["location"]).path
    assert get(site, f"{web1.front}{tus_path}", method="HEAD", headers=V).status_code == 200
    with worker_paused(site):
        keys = [upload(site, web2, os.urandom(50_000)) for _ in range(3)]
        drain = subprocess.Popen(
            site.command(
                web2.host,
                [sys.executable, "-m", "qproxy", "drain", "--timeout", "90"],
                web2.files,
            ),
            env={**os.environ, **web2.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def refused() -> bool:
            def post() -> httpx.Response:
                files = {"file": ("x.bin", b"late")}
                return httpx.post(f"{web2.front}/upload", files=files, timeout=30)

            answer = site.client.run(post)
            return answer.status_code == 503 and "retry-after" in answer.headers

        # New uploads are refused while it drains: 503 with Retry-After.
        wait_for(refused, timeout=30)
        # And the load balancer is told to send it nothing more (asked from another host).
        ready = get(site, f"http://{web2.host.address}:8300/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True, ready.text
        alive = get(site, f"http://{web2.host.address}:8300/healthz")
        assert alive.status_code == 200
    out, err = drain.communicate(timeout=120)
    assert drain.returncode == 0, err
    assert "drained" in out
    for key in keys:
        now = record(site, key)
        assert now is not None and now.state == "remote"
    time.sleep(2.5)  # two janitor rounds: a drained node does not register again
    nodes = listed()
    assert "web2" not in nodes and "web1" in nodes
    # Its node left: the protocol's answer to start again, from any node.
    gone = get(site, f"{web1.front}{tus_path}", method="HEAD", headers=V)
    assert gone.status_code == 404 and gone.headers["tus-resumable"] == "1.0.0"
    # Back in service.
    assert site.qproxy(web2, "drain", "--cancel").returncode == 0
    wait_for(lambda: "web2" in listed(), timeout=10)
    time.sleep(1.1)  # the middleware looks at the mark once a second
    assert upload(site, web2, b"welcome back")


def test_the_redis_master_dies_and_every_host_follows_the_failover(site: Cluster) -> None:
    # Last: the cluster runs on the promoted replica afterwards. Uploads on both nodes
    # while the Redis host's master is SIGKILLed; the sentinels on three hosts promote the
    # replica on another; the web nodes, their resolvers and the worker host follow.
    web1, web2 = site.nodes["web1"], site.nodes["web2"]
    sent: dict[str, bytes] = {}
    for i in range(40):
        if i == 10:
            site.services["redis"].signal(signal.SIGKILL)
        data = os.urandom(20_000 + i)
        sent[upload(site, (web1, web2)[i % 2], data)] = data
        time.sleep(0.1)

    def promoted() -> bool:
        return site.client.run(
            lambda: redis.Redis(host="10.233.0.13").info("replication")["role"] == "master"
        )

    wait_for(promoted, timeout=60)
    for key, data in sent.items():
        wait_for(lambda k=key: (r := record(site, k)) is not None and r.state == "remote", 120)
        # Served, from S3 now, through either node.
        assert get(site, f"{web2.front}/media/{key}", follow_redirects=True).content == data
