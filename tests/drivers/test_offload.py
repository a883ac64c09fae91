"""Offload mode through real nginx (`qproxy nginx-config --offload`): nginx writes raw
bodies to disk itself and the middleware takes the file; nothing is left behind."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import _stack, needs_nginx, wait_state

pytestmark = needs_nginx


@pytest.fixture(scope="module")
def offload_stack() -> Iterator[Stack]:
    with _stack(offload=True, QPROXY_RAW_UPLOAD_PATHS="/files/*") as s:
        yield s


def _leftovers(stack: Stack) -> list[str]:
    node = Stores(stack.config)
    folder = node.local.offload_dir
    left = sorted(os.listdir(folder)) if folder.is_dir() else []
    return left + [name for name, _ in node.local.pending()]


def test_raw_upload_is_written_by_nginx_and_served(offload_stack: Stack) -> None:
    stack = offload_stack
    data = os.urandom(8 * 1024 * 1024 + 3)
    r = httpx.put(
        f"{stack.front}/files/movie.bin",
        content=data,
        headers={"Content-Type": "video/mp4"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    answer = r.json()
    (upload,) = answer["uploads"]
    key = answer["key"]
    assert upload["key"] == key and upload["size"] == len(data)
    assert upload["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload["content_type"] == "video/mp4" and upload["filename"] == "movie.bin"
    assert answer["body"] == ""
    assert not {"X-Qproxy-Body-File", "X-Qproxy-Body-Token"} & set(answer["headers"])
    served = httpx.get(f"{stack.front}/media/{key}", follow_redirects=True, timeout=60)
    assert served.status_code == 200 and served.content == data
    assert _leftovers(stack) == []
    wait_state(Stores(stack.config), key, "remote")
    served = httpx.get(f"{stack.front}/media/{key}", follow_redirects=True, timeout=60)
    assert served.content == data


def test_chunked_and_empty_bodies(offload_stack: Stack) -> None:
    stack = offload_stack
    data = os.urandom(300_000)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = httpx.post(f"{stack.front}/files/chunked.bin", content=chunks(), timeout=60)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert httpx.get(f"{stack.front}/media/{key}", follow_redirects=True).content == data
    r = httpx.put(f"{stack.front}/files/empty.txt", content=b"")
    assert r.status_code == 201, r.text
    assert r.json()["uploads"][0]["size"] == 0
    assert _leftovers(stack) == []


def test_refused_upload_and_forged_headers_leave_nothing(offload_stack: Stack) -> None:
    stack = offload_stack
    r = httpx.put(f"{stack.front}/files/no.bin?status=403", content=b"refused bytes")
    assert r.status_code == 403
    key = r.json()["key"]
    assert not Stores(stack.config).local.exists(key)
    # A client's own offload headers are replaced by nginx's: the body it sent is stored.
    victim = Stores(stack.config).local.journal.path
    r = httpx.put(
        f"{stack.front}/files/forged.txt",
        content=b"what I sent",
        headers={"X-QProxy-Body-File": str(victim), "X-QProxy-Body-Token": "x"},
    )
    assert r.status_code == 201, r.text
    served = httpx.get(f"{stack.front}/media/{r.json()['key']}", follow_redirects=True)
    assert served.content == b"what I sent"
    assert victim.exists()
    # Straight to the app (not through nginx) the forged headers are refused.
    r = httpx.put(
        f"{stack.url('app')}/files/direct.txt",
        content=b"",
        headers={"X-QProxy-Body-File": str(victim), "X-QProxy-Body-Token": "x"},
    )
    assert r.status_code == 400 and "token" in r.text
    assert victim.exists()
    assert _leftovers(stack) == []


def test_a_form_posted_to_a_raw_path_is_parsed_from_nginx_file(offload_stack: Stack) -> None:
    # nginx offloads every body on a raw path, forms too: qproxy parses the file it wrote.
    stack = offload_stack
    data = os.urandom(300_000)
    r = httpx.post(
        f"{stack.front}/files/form",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        data={"title": "holiday"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    (upload,) = r.json()["uploads"]
    assert upload["filename"] == "photo.jpg" and upload["size"] == len(data)
    # (From the local disk, or from S3 if the worker was that quick.)
    served = httpx.get(f"{stack.front}/media/{upload['key']}", follow_redirects=True, timeout=60)
    assert served.status_code == 200 and served.content == data
    assert _leftovers(stack) == []
