"""Server rows: granian against gunicorn (WSGI uploads) and uvicorn (the resolver)."""

from __future__ import annotations

import os
import signal
import sys

import httpx

from bench.common import (
    Bench,
    MiB,
    Row,
)


def servers_row(b: Bench) -> None:
    """Which server for each role: granian against gunicorn (WSGI uploads) and uvicorn
    (the resolver), same app, same run."""
    size = (8 if b.quick else 256) * MiB
    path = b.big_file(size)
    worker = b.stack.services["worker"]
    worker.signal(signal.SIGSTOP)
    try:
        gr = b.granian("srv-granian", "bench.apps:wsgi_qproxy", "wsgi")
        gu = b.gunicorn("srv-gunicorn", "bench.apps:wsgi_qproxy()")

        b.alternate(
            Row(
                f"server: upload {size // MiB} MiB through the WSGI middleware",
                "MiB/s",
                "granian (1 worker)",
                "gunicorn (1 worker, 4 threads)",
            ),
            lambda: b.stored_upload(gr + "/upload", path),
            lambda: b.stored_upload(gu + "/upload", path),
        )
        b.stop("srv-granian")
        b.stop("srv-gunicorn")
    finally:
        worker.signal(signal.SIGCONT)

    data = os.urandom(64 * 1024)
    r = httpx.post(b.stack.front + "/upload", files={"file": ("srv.bin", data)})
    key = r.json()["keys"][0]
    seconds = 2 if b.quick else 6
    resolver = [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1"]
    urls = {
        server: b.serve(
            f"srv-resolver-{server}",
            [*resolver, "--port", "{port}", "--server", server],
            "/metrics",
            env={"QPROXY_JANITOR_INTERVAL": "3600"},
        )
        for server in ("granian", "uvicorn")
    }
    b.alternate(
        Row(
            "server: the resolver, 64 KiB local key (wrk, no nginx)",
            "req/s",
            "granian",
            "uvicorn (httptools, uvloop)",
        ),
        lambda: b.wrk(f"{urls['granian']}/resolve/{key}", seconds)["rps"],
        lambda: b.wrk(f"{urls['uvicorn']}/resolve/{key}", seconds)["rps"],
    )
    for server in urls:
        b.stop(f"srv-resolver-{server}")
