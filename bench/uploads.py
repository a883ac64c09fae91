"""Upload rows: the middlewares against the frameworks' own parsing and against nginx writing
the body itself; memory for a 1 GiB upload; request latency against an app that uploads to S3."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    CONCURRENT_UPLOADS,
    NGINX_BODY,
    Bench,
    MiB,
    Row,
)
from qproxy.ops.nginx import NginxOptions, full_config


def upload_rows(b: Bench) -> None:
    size = (8 if b.quick else 256) * MiB
    path = b.big_file(size)
    # A round takes a second or less, and one here and there is hit by the VM's cold
    # memory (warm_memory): five rounds keep one bad round from setting the median.
    rounds = 1 if b.quick else max(b.rounds, 5)
    worker = b.stack.services["worker"]
    worker.signal(signal.SIGSTOP)  # transfers would compete for the 2 cores; measured apart
    try:
        qp = b.gunicorn("wsgi-qproxy", "bench.apps:wsgi_qproxy()")
        wz = b.gunicorn("wsgi-werkzeug", "bench.apps:wsgi_werkzeug")
        ngx = b.nginx("nginx-body", NGINX_BODY.replace("{tmp}", str(b.tmp / "nginx-body")))
        # The ceiling of a system that loses nothing: nginx writes the body (offload mode's
        # config) and a bare app fsyncs the file, nothing else.
        raw_config = b.stack.config.replace(raw_upload_paths="/raw/*", max_upload_bytes=2 * size)

        def offload_nginx(name: str, app: str) -> str:
            options = NginxOptions(
                listen="127.0.0.1:{port}", app=app, resolver=b.stack.url("resolver"), offload=True
            )
            return b.nginx(name, full_config(raw_config, options))

        fs = b.gunicorn("wsgi-fsync", "bench.apps:wsgi_fsync_body")
        durable = offload_nginx("nginx-durable", fs)

        def cand() -> float:
            return b.stored_upload(qp + "/upload", path)

        def ceiling(raw: bool = False) -> float:
            # nginx takes 256 MiB in 60-150 ms, so one run swings 2x with scheduling
            # (measured 1.7-4.1 GB/s in a row): the median of three runs is its value.
            return statistics.median(
                b.curl_upload(ngx + "/upload", path, raw=raw) for _ in range(3)
            )

        def durable_ceiling() -> float:
            return b.curl_upload(durable + "/raw/big.bin", path, raw=True)

        def against_nginx(label: str, candidate: Callable[[], float]) -> None:
            """``candidate`` against nginx writing the same bytes durably (the target), and
            into the page cache only (information: it promises nothing)."""
            b.alternate(
                Row(
                    f"upload {size // MiB} MiB, {label} vs durable nginx",
                    "MiB/s",
                    f"qproxy middleware ({label})",
                    "nginx body to disk + fsync (the same bytes, raw)",
                    target=">= 0.5x durable nginx",
                    target_ratio=0.5,
                ),
                candidate,
                durable_ceiling,
                rounds=rounds,
            )
            b.alternate(
                Row(
                    f"upload {size // MiB} MiB, {label} vs nginx page cache",
                    "MiB/s",
                    f"qproxy middleware ({label})",
                    "nginx body to the page cache (promises nothing: information)",
                ),
                candidate,
                ceiling,
                rounds=rounds,
            )

        row = b.alternate(
            Row(
                f"upload {size // MiB} MiB, WSGI (gunicorn)",
                "MiB/s",
                "qproxy middleware",
                "werkzeug parse_form_data",
                target=">= 1.5x werkzeug",
                target_ratio=1.5,
            ),
            cand,
            lambda: b.curl_upload(wz + "/upload", path),
            rounds=rounds,
        )
        against_nginx("WSGI, gunicorn", cand)
        b.stop("wsgi-qproxy")
        b.stop("wsgi-werkzeug")
        # The servers many users run: gunicorn's default sync worker, and waitress (which
        # takes the whole body before it calls the app), each against the same app parsing
        # the upload with werkzeug on the same server.
        # waitress as the README runs it (--recv-bytes 1 MiB), and as it comes (8 KiB reads:
        # its own reading of the body is most of the time then, for both apps).
        servers = (
            ("gunicorn_sync", "gunicorn sync", 2.0),
            ("waitress", "waitress, --recv-bytes 1 MiB", 2.0),
            ("waitress_defaults", "waitress, default 8 KiB reads", None),
        )
        for server, label, target in servers:
            start = getattr(b, server)
            ours = start(
                f"{server}-qproxy",
                "bench.apps:wsgi_qproxy" + ("()" if server == "gunicorn_sync" else ""),
            )
            theirs = start(
                f"{server}-werkzeug",
                "bench.apps:wsgi_werkzeug" + ("" if server == "gunicorn_sync" else "_app"),
            )
            floor = start(
                f"{server}-durable",
                "bench.apps:wsgi_durable_copy" + ("" if server == "gunicorn_sync" else "_app"),
            )
            b.alternate(
                Row(
                    f"upload {size // MiB} MiB, WSGI ({label})",
                    "MiB/s",
                    "qproxy middleware",
                    "werkzeug parse_form_data, same server",
                    target=f">= {target:g}x werkzeug" if target else "information (no target)",
                    target_ratio=target,
                ),
                lambda url=ours: b.stored_upload(url + "/upload", path),
                lambda url=theirs: b.curl_upload(url + "/upload", path),
                rounds=rounds,
            )
            # What any app that keeps the upload safely pays on this server (werkzeug's temp
            # file is never fsynced): where the rest of the gap is.
            b.alternate(
                Row(
                    f"upload {size // MiB} MiB, WSGI ({label}) vs a durable copy",
                    "MiB/s",
                    "qproxy middleware",
                    "the raw body written + fsynced, same server",
                    target="information (no target)",
                ),
                lambda url=ours: b.stored_upload(url + "/upload", path),
                lambda url=floor: b.curl_upload(url + "/upload", path),
                rounds=rounds,
            )
            b.stop(f"{server}-qproxy")
            b.stop(f"{server}-werkzeug")
            b.stop(f"{server}-durable")
        # The same under granian, the documented WSGI server (README, "which server").
        gq = b.granian("wsgi-qproxy-granian", "bench.apps:wsgi_qproxy", "wsgi")

        def gcand() -> float:
            return b.stored_upload(gq + "/upload", path)

        against_nginx("WSGI, granian", gcand)
        b.stop("wsgi-qproxy-granian")
        aq = b.uvicorn("asgi-qproxy", "bench.apps:asgi_qproxy")
        st = b.uvicorn("asgi-starlette", "bench.apps:asgi_starlette")

        def acand() -> float:
            return b.stored_upload(aq + "/upload", path)

        b.alternate(
            Row(
                f"upload {size // MiB} MiB, ASGI (uvicorn)",
                "MiB/s",
                "qproxy middleware",
                "Starlette request.form()",
                target=">= 1.0x Starlette",
                target_ratio=1.0,
            ),
            acand,
            lambda: b.curl_upload(st + "/upload", path),
            rounds=rounds,
        )
        against_nginx("ASGI, uvicorn", acand)
        # What any ASGI app that keeps the upload safely pays on this server: uvicorn copies
        # each body chunk twice before the app sees it (a bytearray, then bytes of it).
        floor = b.uvicorn("asgi-durable", "bench.apps:asgi_durable_copy")
        b.alternate(
            Row(
                f"upload {size // MiB} MiB, ASGI (uvicorn) vs a durable copy",
                "MiB/s",
                "qproxy middleware",
                "the raw body written + fsynced, same server",
                target="information (no target)",
            ),
            acand,
            lambda: b.curl_upload(floor + "/upload", path),
            rounds=rounds,
        )
        b.stop("asgi-durable")
        b.stop("asgi-qproxy")
        b.stop("asgi-starlette")

        # Offload mode: nginx writes the raw body, qproxy hashes, fsyncs and renames it.
        raw_env = {"QPROXY_RAW_UPLOAD_PATHS": "/raw/*"}
        oq = b.gunicorn("wsgi-offload", "bench.apps:wsgi_qproxy()", env=raw_env)
        offload = offload_nginx("nginx-offload", oq)

        def ocand() -> float:
            return b.stored_upload(offload + "/raw/big.bin", path, raw=True)

        b.alternate(
            Row(
                f"ingest {size // MiB} MiB raw body, offload mode",
                "MiB/s",
                "nginx writes, qproxy hashes + fsyncs + renames",
                "nginx body to the page cache (promises nothing: information)",
            ),
            ocand,
            lambda: ceiling(raw=True),
            rounds=rounds,
        )
        # The same, against the durable ceiling.
        b.alternate(
            Row(
                f"ingest {size // MiB} MiB raw body, offload mode vs durable nginx",
                "MiB/s",
                "nginx writes, qproxy hashes + fsyncs + renames",
                "nginx body to disk + fsync (no hash): the ceiling of a system that loses nothing",
                target=">= 0.9x",
                target_ratio=0.9,
            ),
            ocand,
            durable_ceiling,
            rounds=rounds,
        )

        # A node takes many uploads at once: while one is hashed, nginx writes the next, so
        # the two cores overlap what one upload does in turn.
        def together(url: str) -> float:
            rate = b.curl_many(url, path, CONCURRENT_UPLOADS, raw=True)
            b.clean_local()
            return rate

        b.alternate(
            Row(
                f"ingest {CONCURRENT_UPLOADS} x {size // MiB} MiB raw bodies at once, offload mode",
                "MiB/s",
                "nginx writes, qproxy hashes + fsyncs + renames",
                "nginx body to disk",
            ),
            lambda: together(offload + "/raw/big.bin"),
            lambda: together(ngx + "/upload"),
            rounds=rounds,
        )
        for name in ("nginx-offload", "wsgi-offload", "nginx-durable", "wsgi-fsync", "nginx-body"):
            b.stop(name)
        del row
    finally:
        worker.signal(signal.SIGCONT)


def memory_row(b: Bench) -> None:
    size = (16 if b.quick else 1024) * MiB
    path = b.big_file(size)
    worker = b.stack.services["worker"]
    worker.signal(signal.SIGSTOP)
    try:
        url = b.gunicorn("wsgi-mem", "bench.apps:wsgi_qproxy()")
        master = b.stack.services["wsgi-mem"].process.pid
        child = int(
            subprocess.run(
                ["pgrep", "-P", str(master)], capture_output=True, text=True
            ).stdout.split()[0]
        )
        b.curl_upload(url + "/upload", b.big_file(MiB))  # warm up
        growth = _peak_growth(child, lambda: b.curl_upload(url + "/upload", path))
        b.clean_local()
        row = Row(
            f"memory, one {size // MiB} MiB upload (WSGI)",
            "MiB",
            "server peak RSS growth",
            "-",
            cand=[growth],
            higher_is_better=False,
            target="< 16 MiB",
        )
        row.note = "met" if growth < 16 else "MISSED"
        b.rows.append(row)
        print(f"  {row.name}: {growth:.1f} MiB ({row.note})", flush=True)
        b.stop("wsgi-mem")
    finally:
        worker.signal(signal.SIGCONT)


def _peak_growth(pid: int, run: Callable[[], object]) -> float:
    """How far above its present size (MiB) process ``pid`` went while ``run`` ran. Its
    peak (VmHWM) is reset first: without that, a peak from earlier rounds hid the one
    measured (seen: 0.0 MiB for the tus PATCH, its process larger before than since)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    before = _status_kib(pid, "VmRSS")
    run()
    return max(0.0, (_status_kib(pid, "VmHWM") - before) / 1024)


def _status_kib(pid: int, field_name: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return float(re.search(rf"{field_name}:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def latency_row(b: Bench) -> None:
    path = b.big_file((2 if b.quick else 20) * MiB)
    mib = path.stat().st_size // MiB
    servers = (
        ("gunicorn", "WSGI, gunicorn"),
        ("granian", "WSGI, granian"),
        ("uvicorn", "ASGI, uvicorn"),
    )
    for server, label in servers:
        if server == "gunicorn":
            qp = b.gunicorn("lat-qproxy", "bench.apps:wsgi_qproxy()")
            inline = b.gunicorn("lat-inline", "bench.apps:wsgi_s3_inline")
        elif server == "granian":
            qp = b.granian("lat-qproxy", "bench.apps:wsgi_qproxy", "wsgi")
            inline = b.granian("lat-inline", "bench.apps:wsgi_s3_inline_app", "wsgi")
        else:
            qp = b.uvicorn("lat-qproxy", "bench.apps:asgi_qproxy")
            inline = b.uvicorn("lat-inline", "bench.apps:asgi_s3_inline")

        def cand(url: str = qp) -> float:
            t = b.curl_time(url + "/upload", path)
            b.clean_local()
            return t * 1000

        # The documented servers carry the target (README, "which server"); gunicorn is
        # measured beside them. Short requests, noisy baseline: more rounds, after one
        # unmeasured request each (first-request setup: S3 and broker clients).
        documented = server != "gunicorn"
        cand()
        b.curl_time(inline + "/upload", path)
        row = b.alternate(
            Row(
                f"request latency, {mib} MiB upload ({label})",
                "ms",
                "app behind qproxy",
                "app uploading to S3 in the request",
                higher_is_better=False,
                target="<= 0.3x" if documented else "",
                target_ratio=0.3 if documented else None,
            ),
            cand,
            lambda url=inline: b.curl_time(url + "/upload", path) * 1000,
            rounds=1 if b.quick else max(b.rounds, 11),
        )
        row.note = f"{len(row.cand)} rounds" + ("" if documented else "; not a documented server")
        b.stop("lat-qproxy")
        b.stop("lat-inline")


def _tus_pieces(b: Bench) -> tuple[int, int, list[Path]]:
    """The tus rows' file (256 MiB) cut in 16 MiB pieces, one per PATCH."""
    size, chunk = (8, 2) if b.quick else (256, 16)
    size, chunk = size * MiB, chunk * MiB
    path = b.big_file(size)
    pieces = []
    with open(path, "rb") as fh:
        for i in range(size // chunk):
            piece = b.tmp / f"tus-piece-{i}"
            if not piece.exists():
                piece.write_bytes(fh.read(chunk))
            else:
                fh.seek(chunk, os.SEEK_CUR)
            pieces.append(piece)
    return size, chunk, pieces


def _tus_send(base: str, size: int, chunk: int, pieces: list[Path]) -> float:
    """One tus upload with curl (a POST, then a PATCH a piece); MiB/s."""
    started = time.monotonic()
    made = subprocess.run(
        ["curl", "-s", "-D", "-", "-o", "/dev/null", "-X", "POST",
         "-H", "Tus-Resumable: 1.0.0", "-H", f"Upload-Length: {size}",
         "-H", "Upload-Metadata: filename YmVuY2guYmlu", base + "/files/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    location = next(
        line.split(":", 1)[1].strip()
        for line in made.splitlines()
        if line.lower().startswith("location:")
    )
    url = location if "://" in location else base + location
    # One curl for every PATCH, one kept-alive connection, as a tus client sends them.
    argv = ["curl", "-s"]
    for i, piece in enumerate(pieces):
        if i:
            argv.append("--next")
        argv += ["-o", "/dev/null", "-w", "%{http_code}\n", "-X", "PATCH",
                 "-H", "Tus-Resumable: 1.0.0", "-H", f"Upload-Offset: {i * chunk}",
                 "-H", "Content-Type: application/offset+octet-stream",
                 "-H", "Expect:", "-T", str(piece), url]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["204"] * len(pieces), out
    return size / MiB / (time.monotonic() - started)


def _disk_floor(b: Bench, pieces: list[Path]) -> float:
    """Each piece written and fsynced into the local root's filesystem, in MiB/s."""
    target = Path(b.stack.env["QPROXY_LOCAL_ROOT"]) / "disk-floor.bin"
    started = time.monotonic()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for piece in pieces:
            data = piece.read_bytes()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
    finally:
        os.close(fd)
        target.unlink()
    return sum(p.stat().st_size for p in pieces) / MiB / (time.monotonic() - started)


def tus_row(b: Bench) -> None:
    """A resumable upload (tus) in 16 MiB chunks, each PATCH fsynced before its answer,
    against one multipart upload of the same file through the same middleware."""
    size, chunk, pieces = _tus_pieces(b)
    path = b.big_file(size)
    worker = b.stack.services["worker"]
    worker.signal(signal.SIGSTOP)  # transfers would compete for the 2 cores
    try:
        app = b.gunicorn(
            "wsgi-qproxy-tus", "bench.apps:wsgi_qproxy()", env={"QPROXY_TUS_PATH": "/files/"}
        )

        def cand() -> float:
            rate = _tus_send(app, size, chunk, pieces)
            b.clean_local()
            return rate

        b.alternate(
            Row(
                f"tus upload {size // MiB} MiB in {chunk // MiB} MiB chunks, WSGI (gunicorn)",
                "MiB/s",
                "tus (each chunk fsynced), curl PATCHes",
                "one multipart upload, same middleware",
                target=">= 0.8x",
                target_ratio=0.8,
            ),
            cand,
            lambda: b.stored_upload(app + "/upload", path),
            rounds=1 if b.quick else 3,
        )
        b.stop("wsgi-qproxy-tus")
        # Against the Python tus server people use: tuspyserver, under uvicorn as qproxy's
        # ASGI middleware is here, the same file and chunks. tuspyserver fsyncs its state
        # file but not the data (file.flush() only): an offset it answered can be lost in a
        # power cut. qproxy fsyncs each PATCH, so it cannot go faster than the disk: the
        # row's note gives the disk's own write + fsync rate, measured in the same run.
        ours = b.uvicorn(
            "asgi-qproxy-tus", "bench.apps:asgi_qproxy_tus", env={"QPROXY_TUS_PATH": "/files/"}
        )
        theirs = b.uvicorn("asgi-tuspyserver", "bench.apps:asgi_tuspyserver")
        sink = b.tmp / "sink" / "tus"  # (BENCH_SINK of the apps)

        def baseline() -> float:
            rate = _tus_send(theirs, size, chunk, pieces)
            shutil.rmtree(sink, ignore_errors=True)
            return rate

        def ours_once() -> float:
            rate = _tus_send(ours, size, chunk, pieces)
            b.clean_local()
            return rate

        row = b.alternate(
            Row(
                f"tus upload {size // MiB} MiB in {chunk // MiB} MiB chunks, ASGI (uvicorn)",
                "MiB/s",
                "qproxy's tus (ASGI middleware), each PATCH fsynced",
                "tuspyserver (FastAPI router), data not fsynced",
                target=">= 2x",
                target_ratio=2.0,
            ),
            ours_once,
            baseline,
            rounds=1 if b.quick else 3,
        )
        # Both fsync every PATCH: what the disk itself allows, measured now.
        floor = _disk_floor(b, pieces)
        row.note = f"disk floor (write + fsync of each {chunk // MiB} MiB piece): {floor:.0f} MiB/s"
        print(f"    {row.note}", flush=True)
        # One PATCH of the whole file: memory must not grow with it.
        grown = []
        for name, url, clean in (
            ("asgi-qproxy-tus", ours, b.clean_local),
            ("asgi-tuspyserver", theirs, lambda: shutil.rmtree(sink, ignore_errors=True)),
        ):
            pid = b.stack.services[name].process.pid
            grown.append(_peak_growth(pid, functools.partial(_tus_send, url, size, size, [path])))
            clean()
        mem = Row(
            f"memory, one {size // MiB} MiB tus PATCH, ASGI (uvicorn)",
            "MiB",
            "qproxy's tus: server peak RSS growth",
            "tuspyserver: server peak RSS growth",
            cand=[grown[0]],
            base=[grown[1]],
            higher_is_better=False,
            target="< 16 MiB",
        )
        mem.note = "met" if grown[0] < 16 else "MISSED"
        b.rows.append(mem)
        print(f"  {mem.name}: {grown[0]:.1f} vs {grown[1]:.1f} MiB ({mem.note})", flush=True)
        b.stop("asgi-qproxy-tus")
        b.stop("asgi-tuspyserver")
    finally:
        worker.signal(signal.SIGCONT)
