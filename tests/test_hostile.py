"""Hostile input, as a stranger sends it: through nginx with the generated config, to the
middleware under every server people run it on (WSGI: gunicorn sync and gthread, granian,
waitress; ASGI: uvicorn, granian).

The pass rule for every bad input: a 4xx (never a 5xx), nothing kept, and the next normal
upload still works.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import _stack, needs_nginx, wait_state

pytestmark = [needs_nginx]

SERVERS = [
    ("wsgi", "gunicorn-sync"),
    ("wsgi", "gunicorn-gthread"),
    ("wsgi", "granian"),
    ("wsgi", "waitress"),
    ("asgi", "uvicorn"),
    ("asgi", "granian"),
]
BOUNDARY = "qphostile"


@pytest.fixture(scope="module", params=SERVERS, ids=[f"{k}-{s}" for k, s in SERVERS])
def site(request: pytest.FixtureRequest) -> Iterator[Stack]:
    kind, server = request.param
    with _stack(
        app=f"tests.hostile_apps:{kind}_app",
        app_server=server,
        offload=True,
        QPROXY_RAW_UPLOAD_PATHS="/files/*",
        # glibc gives each thread its own malloc arena (up to 8 per core) and keeps what is
        # freed in it: the memory check would count the server's threads, not what qproxy
        # holds. Two arenas, as Python servers are commonly run in production.
        MALLOC_ARENA_MAX="2",
    ) as stack:
        # Uploads stay local (served by nginx from the disk) unless a test lets the worker
        # run: a worker quicker than the test would turn a local answer into a redirect.
        stack.services["worker"].signal(signal.SIGSTOP)
        try:
            # The baseline is taken warm: each bad body a few times first, so the server's heap and
            # its threads' malloc arenas have their working size (glibc keeps both; their
            # first growth is no leak). The battery must then not grow it by 50 MB.
            normal_upload_works(stack)
            for make in (_big_field, _many_parts, _long_preamble, _many_headers):
                body = make()
                for _ in range(5):
                    post(stack, "/upload", body)
            BASELINE_RSS[id(stack)] = app_rss(stack)
            yield stack
        finally:
            stack.services["worker"].signal(signal.SIGCONT)


BASELINE_RSS: dict[int, int] = {}


def app_rss(stack: Stack) -> int:
    """Resident memory of the app server and its worker processes, in bytes."""
    total, todo = 0, [stack.services["app"].process.pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        total += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
        )
    return total * 1024


def stored_files(stack: Stack) -> set[str]:
    """Every file under the local root, temp files included (not the journal)."""
    root = Path(stack.config.local_root)
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "journal" not in p.parts
    }


def multipart(*parts: bytes) -> bytes:
    return b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + p + b"\r\n" for p in parts) + (
        b"--" + BOUNDARY.encode() + b"--\r\n"
    )


def file_part(
    data: bytes, filename: str = "a.bin", ctype: str = "application/octet-stream"
) -> bytes:
    return (
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode() + data


def post(stack: Stack, path: str, body: bytes, **headers: str) -> httpx.Response:
    all_headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers}
    return httpx.post(stack.front + path, content=body, headers=all_headers, timeout=30)


def raw_request(stack: Stack, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes exactly as given (headers a client library would not send twice)."""
    port = stack.ports["nginx"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[-1]


def normal_upload_works(stack: Stack) -> None:
    r = post(stack, "/upload", multipart(file_part(b"still fine", "ok.txt", "text/plain")))
    assert r.status_code == 201, r.text
    (upload,) = r.json()["uploads"]
    assert httpx.get(f"{stack.files_url}/media/{upload['key']}").content == b"still fine"


# -- 2. stored XSS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "ctype"),
    [
        ("page.html", "application/octet-stream"),
        ("page.html", "text/html"),
        ("x.svg", "image/svg+xml"),
        ("x.xml", "application/xml"),
        ("noext", "text/html; charset=utf-8"),
    ],
)
def test_active_content_is_never_served_inline(site: Stack, filename: str, ctype: str) -> None:
    body = b"<html><script>alert(document.cookie)</script></html>"
    r = post(site, "/upload", multipart(file_part(body, filename, ctype)))
    assert r.status_code == 201, r.text
    (upload,) = r.json()["uploads"]
    got = httpx.get(f"{site.files_url}/media/{upload['key']}")
    assert got.status_code == 200 and got.content == body
    assert got.headers["content-disposition"].startswith("attachment")
    assert got.headers["content-type"].split(";")[0] not in ("text/html", "image/svg+xml")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]


def test_images_stay_inline_with_nosniff(site: Stack) -> None:
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    r = post(site, "/upload", multipart(file_part(png, "cat.png", "image/png")))
    (upload,) = r.json()["uploads"]
    got = httpx.get(f"{site.files_url}/media/{upload['key']}")
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"].startswith("inline")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]


def test_s3_serves_active_content_as_an_attachment_too(site: Stack) -> None:
    body = b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>"
    r = post(site, "/upload", multipart(file_part(body, "x.svg", "image/svg+xml")))
    (upload,) = r.json()["uploads"]
    worker = site.services["worker"]
    worker.signal(signal.SIGCONT)
    try:
        wait_state(Stores(site.config), upload["key"], "remote")
    finally:
        worker.signal(signal.SIGSTOP)
    redirect = httpx.get(f"{site.files_url}/media/{upload['key']}")
    assert redirect.status_code == 302
    assert "response-content-disposition=attachment" in redirect.headers["location"]
    from_s3 = httpx.get(redirect.headers["location"])
    assert from_s3.content == body
    assert from_s3.headers["content-disposition"].startswith("attachment")
    assert from_s3.headers["content-type"] == "application/octet-stream"


# -- 3. files the app never looked at --------------------------------------------------------


def test_a_route_that_never_reads_its_body_keeps_nothing(site: Stack) -> None:
    before = stored_files(site)
    r = httpx.post(
        site.front + "/login",
        content=multipart(file_part(os.urandom(256 * 1024))),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        follow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 302
    time.sleep(0.2)
    assert stored_files(site) - before == set()
    normal_upload_works(site)


# -- 1. headers read two ways ----------------------------------------------------------------


def test_a_repeated_content_type_is_refused(site: Stack) -> None:
    body = multipart(file_part(b"sneaky"))
    head = (
        "POST /upload HTTP/1.1\nHost: t\nConnection: close\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\nContent-Type: text/plain\n"
        f"Content-Length: {len(body)}\n"
    )
    before = stored_files(site)
    status, answer = raw_request(site, head, body)
    if site.app_server == "granian" and "wsgi_app" in site.app:
        # granian hands a WSGI app one Content-Type (PEP 3333 environ has room for one):
        # the app reads the same one qproxy did, so qproxy took the file, no bypass.
        assert status == 201 and b'"files":[]' in answer, answer
    else:
        assert status == 400, answer
        assert stored_files(site) - before == set()
    normal_upload_works(site)


def test_a_repeated_part_disposition_is_refused(site: Stack) -> None:
    part = (
        b'Content-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        b'Content-Disposition: form-data; name="other"\r\n\r\nx'
    )
    r = post(site, "/upload", multipart(part))
    assert r.status_code == 400, r.text


# -- 5, 6, 7. refusals arrive as the 4xx they are, every time --------------------------------


def _big_field() -> bytes:
    return multipart(b'Content-Disposition: form-data; name="t"\r\n\r\n' + b"x" * (3 << 20))


def _many_parts() -> bytes:
    return multipart(*[b'Content-Disposition: form-data; name="f"\r\n\r\n1'] * 50_000)


def _long_preamble() -> bytes:
    return b"x" * (2 << 20) + multipart(file_part(b"late"))


def _many_headers() -> bytes:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    return multipart(b'Content-Disposition: form-data; name="t"\r\n' + headers + b"\r\nv")


@pytest.mark.parametrize(
    ("make", "status"),
    [(_big_field, 413), (_many_parts, 413), (_long_preamble, 400), (_many_headers, 400)],
    ids=["10-MiB-field", "50k-parts", "long-preamble", "10k-part-headers"],
)
def test_early_refusals_are_the_4xx_every_time(site: Stack, make: object, status: int) -> None:
    body = make()  # type: ignore[operator]
    seen, slowest = [], 0.0
    for _ in range(20):
        started = time.monotonic()
        seen.append(post(site, "/upload", body).status_code)
        slowest = max(slowest, time.monotonic() - started)
    assert seen == [status] * 20
    # The pass rule for bad input: the 4xx within a second (a stall would be seconds).
    assert slowest < 1.0, slowest
    normal_upload_works(site)


# -- 9. filenames -----------------------------------------------------------------------------


def test_bidi_and_invisible_characters_never_reach_a_header(site: Stack) -> None:
    r = post(site, "/upload", multipart(file_part(b"x", "invoice\u202egpj.exe", "text/plain")))
    (upload,) = r.json()["uploads"]
    assert upload["filename"] == "invoicegpj.exe"
    got = httpx.get(f"{site.files_url}/media/{upload['key']}")
    assert "%E2%80%AE" not in got.headers["content-disposition"]


# -- 10. ranges ---------------------------------------------------------------------------------


def test_a_flood_of_ranges_is_not_answered_range_by_range(site: Stack) -> None:
    data = os.urandom(12_000)
    r = post(site, "/upload", multipart(file_part(data, "r.txt", "text/plain")))
    (upload,) = r.json()["uploads"]
    ranges = ",".join(f"{i * 20}-{i * 20 + 1}" for i in range(600))
    got = httpx.get(f"{site.files_url}/media/{upload['key']}", headers={"Range": f"bytes={ranges}"})
    assert len(got.content) <= len(data)  # the whole file at most, never 600 parts
    two = httpx.get(f"{site.files_url}/media/{upload['key']}", headers={"Range": "bytes=0-1,4-5"})
    assert two.status_code == 206


# -- 4. symlinks under the root -----------------------------------------------------------------


def test_a_planted_link_is_never_served(site: Stack, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("server secret")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    folder = Path(site.config.local_root) / "2026" / "06" / "01"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"{os.urandom(6).hex()}.txt"
    os.symlink(secret, link)
    try:
        key = str(link.relative_to(site.config.local_root))
        got = httpx.get(f"{site.files_url}/media/{key}")
        assert got.status_code == 404 and b"server secret" not in got.content
    finally:
        link.unlink()


@pytest.mark.parametrize(
    ("filename", "ctype"), [("page.html", "text/html"), ("x.svg", "image/svg+xml")]
)
def test_active_content_is_an_attachment_in_both_nginx_modes(
    any_stack: Stack, filename: str, ctype: str
) -> None:
    body = b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>"
    r = httpx.post(any_stack.front + "/upload", files={"file": (filename, body, ctype)})
    assert r.status_code == 201, r.text
    (upload,) = r.json()["uploads"]
    # From the disk, or from S3 if the stack's worker was quick: shown the same either way.
    got = httpx.get(f"{any_stack.files_url}/media/{upload['key']}", follow_redirects=True)
    assert got.status_code == 200 and got.content == body
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"].startswith("attachment")
    if "x-qproxy-source" in got.headers:
        assert got.headers["x-content-type-options"] == "nosniff"
    png = httpx.post(
        any_stack.front + "/upload", files={"file": ("a.png", b"\x89PNG", "image/png")}
    )
    (image,) = png.json()["uploads"]
    shown = httpx.get(f"{any_stack.files_url}/media/{image['key']}", follow_redirects=True)
    assert shown.headers["content-type"] == "image/png"
    assert shown.headers["content-disposition"].startswith("inline")


# -- 8. offload mode ------------------------------------------------------------------------


def test_a_form_posted_to_a_raw_path_in_offload_mode(site: Stack) -> None:
    data = os.urandom(100_000)
    r = post(site, "/files/form", multipart(file_part(data, "f.bin")))
    assert r.status_code == 201, r.text
    (upload,) = r.json()["uploads"]
    assert upload["size"] == len(data)
    assert httpx.get(f"{site.files_url}/media/{upload['key']}").content == data


def test_a_linked_date_folder_never_takes_an_upload(site: Stack, tmp_path: Path) -> None:
    # Someone with access to the disk swapped today's folder for a link out of the root.
    outside = tmp_path / "outside"
    outside.mkdir()
    today = Path(site.config.local_root) / time.strftime("%Y/%m/%d", time.gmtime())
    today.mkdir(parents=True, exist_ok=True)
    aside = today.with_name(today.name + ".real")
    today.rename(aside)
    os.symlink(outside, today)
    try:
        r = post(site, "/upload", multipart(file_part(b"where do I land?")))
        assert r.status_code == 500  # not storable safely: refused, never followed
        assert list(outside.iterdir()) == []
        assert not any(name.startswith(".qp/tmp/") for name in stored_files(site))
    finally:
        today.unlink()
        aside.rename(today)
    normal_upload_works(site)


# -- last: what the battery cost the server ------------------------------------------------


def _bad_round(site: Stack) -> int:
    """Another round of the bad bodies (80 requests, ~200 MB sent); the server's growth."""
    before = app_rss(site)
    for make in (_big_field, _many_parts, _long_preamble, _many_headers):
        body = make()
        for _ in range(20):
            assert post(site, "/upload", body).status_code in (400, 413)
    normal_upload_works(site)
    return app_rss(site) - before


def test_memory_stayed_flat_through_the_battery(site: Stack) -> None:
    """Memory does not grow with what strangers send: after the whole battery, two more
    rounds of bad bodies, and the smaller growth of the two stays under 50 MB. (A leak grows
    every round; the allocator's swings, measured at up to ~30 MB a round on the ASGI
    servers, go up and down.)"""
    rounds = [_bad_round(site), _bad_round(site)]
    since_start = app_rss(site) - BASELINE_RSS[id(site)]
    shown = ", ".join(f"+{g / 2**20:.1f}" for g in rounds)
    print(f"{site.app_server}: {shown} MiB a round, +{since_start / 2**20:.1f} MiB in all")
    assert min(rounds) < 50 * 1024 * 1024, f"the app server grew {shown} MiB a round"
