"""`make bench`: every figure a ratio against a baseline measured in the same run.

Each row runs its candidate and its baseline alternately for several rounds on this machine
and reports the medians, their ratio and the spread (min-max). Results go to
bench/results/latest.json and latest.md, charts to bench/results/*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from qproxy.compose import Stores
from qproxy.dev.devstack import AWS_TEST_ENV, Stack, free_port
from qproxy.lifecycle.files import commit
from qproxy.ops.nginx import NginxOptions, full_config
from qproxy.stores.state import StateStore
from qproxy.worker.sweep import requeue_stuck

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 1024 * 1024


@dataclass
class Row:
    name: str
    unit: str
    candidate: str
    baseline: str
    cand: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    target: str = ""
    target_ratio: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.cand or not self.base:
            return None
        c, b = statistics.median(self.cand), statistics.median(self.base)
        return None if b == 0 else c / b

    @property
    def met(self) -> bool | None:
        if self.target_ratio is None or self.ratio is None:
            return None
        if self.higher_is_better:
            return self.ratio >= self.target_ratio
        return self.ratio <= self.target_ratio

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["met"] = self.met
        for side in ("cand", "base"):
            values = out[side]
            out[side + "_median"] = statistics.median(values) if values else None
            out[side + "_spread"] = [min(values), max(values)] if values else None
        return out


WARM_BYTES = 1 << 30
CONCURRENT_UPLOADS = 4


def warm_memory(size: int = WARM_BYTES) -> None:
    """Touch ``size`` bytes of memory and free them again, so the next measurement is more
    likely to get pages the host has already backed.

    These machines are VMs that hand freed memory back to the host at once
    (/sys/module/page_reporting/parameters/min_free_ms is 0); the first write to such a
    page costs a fault on the host, and a page-cache write into it runs at ~0.5 GB/s
    instead of ~5 GB/s. Measured: 256 MiB files written one after another ran at
    0.4-0.6 GB/s, and at 5-6 GB/s after touching 3 GiB first. It does not remove the
    effect (a round here and there still writes at ~0.5 GB/s, see the spreads), which is
    why rows run several rounds and report medians. A long-running server writes into
    memory that is long backed, so the warm case is the one that matters.
    """
    with open("/proc/meminfo") as f:
        avail = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]
    size = min(size, avail // 4)
    if size > 0:
        buf = b"\x01" * size
        del buf


class Bench:
    def __init__(self, *, quick: bool, rounds: int) -> None:
        self.quick = quick
        self.rounds = rounds
        self.rows: list[Row] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="qproxy-bench-"))
        os.chmod(self.tmp, 0o755)
        self.stack = Stack(
            settings={
                "PYTHONPATH": str(ROOT),
                "QPROXY_MAX_UPLOAD_BYTES": str(2 * 1024 * MiB),
                "BENCH_SINK": str(self.tmp / "sink"),
            },
            app="bench.apps:wsgi_qproxy",
        )

    # -- servers ------------------------------------------------------------------------

    def serve(
        self, name: str, argv: list[str], health: str, env: dict[str, str] | None = None
    ) -> str:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        self.stack.spawn(name, argv, env=env)
        url = f"http://127.0.0.1:{port}"
        self.stack.wait_for(
            name, lambda: httpx.get(url + health, timeout=2).status_code < 500, timeout=60
        )
        return url

    def gunicorn(self, name: str, app: str, env: dict[str, str] | None = None) -> str:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "1",
            "--threads",
            "4",
            "-b",
            "127.0.0.1:{port}",
            "--timeout",
            "300",
            app,
        ]
        return self.serve(name, argv, "/", env)

    def uvicorn(self, name: str, app: str, env: dict[str, str] | None = None) -> str:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        return self.serve(name, argv, "/", env)

    def granian(
        self, name: str, app: str, interface: str, env: dict[str, str] | None = None
    ) -> str:
        argv = [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            interface,
            "--factory",
            "--no-ws",
            "--log-level",
            "warning",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            app,
        ]
        return self.serve(name, argv, "/", env)

    def stop(self, name: str) -> None:
        service = self.stack.services.pop(name, None)
        if service is not None:
            service.stop()

    def nginx(self, name: str, conf: str) -> str:
        return self.stack.add_nginx(name, conf)

    # -- measuring ----------------------------------------------------------------------

    def alternate(
        self,
        row: Row,
        candidate: Callable[[], float],
        baseline: Callable[[], float],
        *,
        rounds: int | None = None,
    ) -> Row:
        for i in range(rounds or self.rounds):
            pair = [(row.cand, candidate), (row.base, baseline)]
            for values, fn in pair if i % 2 == 0 else reversed(pair):
                # Every measurement starts with no dirty pages from the one before (they
                # would be flushed inside the next one's fsync, or throttle its writes).
                os.sync()
                if not self.quick:
                    warm_memory()
                values.append(fn())
        if rounds and rounds != self.rounds and "rounds" not in row.note:
            row.note = f"{rounds} rounds" + (f"; {row.note}" if row.note else "")
        self.rows.append(row)
        print(f"  {row.name}: {fmt(row)}", flush=True)
        return row

    def curl_upload(self, url: str, path: Path, *, raw: bool = False) -> float:
        """MiB/s of one multipart (or raw PUT) upload by curl (a client that is not the
        bottleneck)."""
        return path.stat().st_size / MiB / self.curl_time(url, path, raw=raw)

    def stored_upload(self, url: str, path: Path, *, raw: bool = False) -> float:
        """:meth:`curl_upload` to a qproxy app, then its files out of the way."""
        rate = self.curl_upload(url, path, raw=raw)
        self.clean_local()
        return rate

    def curl_many(self, url: str, path: Path, count: int, *, raw: bool = False) -> float:
        """MiB/s of ``count`` uploads of ``path`` sent at once (all bytes over wall time)."""
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"]
        body = ["-T", str(path)] if raw else ["-F", f"file=@{path}"]
        started = time.monotonic()
        procs = [
            subprocess.Popen([*argv, *body, url], stdout=subprocess.PIPE, text=True)
            for _ in range(count)
        ]
        codes = [proc.communicate(timeout=600)[0] for proc in procs]
        elapsed = time.monotonic() - started
        assert all(code in ("200", "201") for code in codes), codes
        return count * path.stat().st_size / MiB / elapsed

    def curl_time(self, url: str, path: Path, *, raw: bool = False) -> float:
        """Seconds one multipart upload of ``path`` takes, as the client sees it."""
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"]
        body = ["-T", str(path)] if raw else ["-F", f"file=@{path}"]
        out = subprocess.run(
            [*argv, *body, url],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout.split()
        assert out[0] in ("200", "201"), out
        return float(out[1])

    def wrk(self, url: str, seconds: int) -> dict[str, float]:
        out = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        lat = {
            m.group(1): _ms(m.group(2))
            for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)
        }
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise RuntimeError(f"{url}: {non2xx.group(1)} error responses")
        return {"rps": rps, "p50": lat.get("50", 0.0), "p99": lat.get("99", 0.0)}

    def big_file(self, size: int) -> Path:
        path = self.tmp / f"file-{size}.bin"
        if not path.exists():
            block = os.urandom(MiB)
            with open(path, "wb") as fh:
                for _ in range(size // MiB):
                    fh.write(block)
                fh.write(os.urandom(size % MiB))
        return path

    def clean_local(self) -> None:
        """Uploaded files from earlier rounds: out of the way (disk, page cache)."""
        root = Path(self.stack.env["QPROXY_LOCAL_ROOT"])
        subprocess.run(
            [
                "find",
                str(root),
                "-mindepth",
                "1",
                "-type",
                "f",
                "-not",
                "-path",
                "*/.qp/*",
                "-delete",
            ],
            check=False,
        )


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(\w+)", text)
    assert match, text
    factor = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match.group(2)]
    return float(match.group(1)) * factor


def fmt(row: Row) -> str:
    ratio = row.ratio
    c = statistics.median(row.cand) if row.cand else float("nan")
    b = statistics.median(row.base) if row.base else float("nan")
    verdict = "" if row.met is None else (" ok" if row.met else " MISSED")
    r = "n/a" if ratio is None else f"{ratio:.2f}x"
    return f"{c:.1f} vs {b:.1f} {row.unit} -> {r} (target {row.target or '-'}){verdict}"


# -- the rows ---------------------------------------------------------------------------


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

        def cand() -> float:
            return b.stored_upload(qp + "/upload", path)

        def ceiling(raw: bool = False) -> float:
            # nginx takes 256 MiB in 60-150 ms, so one run swings 2x with scheduling
            # (measured 1.7-4.1 GB/s in a row): the median of three runs is its value.
            return statistics.median(
                b.curl_upload(ngx + "/upload", path, raw=raw) for _ in range(3)
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
        b.alternate(
            Row(
                f"upload {size // MiB} MiB, WSGI (gunicorn) vs nginx ceiling",
                "MiB/s",
                "qproxy middleware (WSGI)",
                "nginx body to disk",
                target=">= 0.25x nginx",
                target_ratio=0.25,
            ),
            cand,
            ceiling,
            rounds=rounds,
        )
        b.stop("wsgi-qproxy")
        b.stop("wsgi-werkzeug")
        # The same under granian, the documented WSGI server (README, "which server").
        gq = b.granian("wsgi-qproxy-granian", "bench.apps:wsgi_qproxy", "wsgi")

        def gcand() -> float:
            return b.stored_upload(gq + "/upload", path)

        b.alternate(
            Row(
                f"upload {size // MiB} MiB, WSGI (granian) vs nginx ceiling",
                "MiB/s",
                "qproxy middleware (WSGI)",
                "nginx body to disk",
                target=">= 0.25x nginx",
                target_ratio=0.25,
            ),
            gcand,
            ceiling,
            rounds=rounds,
        )
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
        b.alternate(
            Row(
                f"upload {size // MiB} MiB, ASGI vs nginx ceiling",
                "MiB/s",
                "qproxy middleware (ASGI)",
                "nginx body to disk",
                target=">= 0.25x nginx",
                target_ratio=0.25,
            ),
            acand,
            ceiling,
            rounds=rounds,
        )
        b.stop("asgi-qproxy")
        b.stop("asgi-starlette")

        # Offload mode: nginx writes the raw body, qproxy hashes, fsyncs and renames it.
        raw_env = {"QPROXY_RAW_UPLOAD_PATHS": "/raw/*"}
        oq = b.gunicorn("wsgi-offload", "bench.apps:wsgi_qproxy()", env=raw_env)
        raw_config = b.stack.config.replace(raw_upload_paths="/raw/*", max_upload_bytes=2 * size)

        def offload_nginx(name: str, app: str) -> str:
            options = NginxOptions(
                listen="127.0.0.1:{port}", app=app, resolver=b.stack.url("resolver"), offload=True
            )
            return b.nginx(name, full_config(raw_config, options))

        offload = offload_nginx("nginx-offload", oq)

        def ocand() -> float:
            return b.stored_upload(offload + "/raw/big.bin", path, raw=True)

        b.alternate(
            Row(
                f"ingest {size // MiB} MiB raw body, offload mode",
                "MiB/s",
                "nginx writes, qproxy hashes + fsyncs + renames",
                "nginx body to disk",
                target=">= 0.5x nginx",
                target_ratio=0.5,
            ),
            ocand,
            lambda: ceiling(raw=True),
            rounds=rounds,
        )
        # The same, against the durable ceiling: nginx writes, a bare app fsyncs the file.
        fs = b.gunicorn("wsgi-fsync", "bench.apps:wsgi_fsync_body")
        durable = offload_nginx("nginx-durable", fs)
        b.alternate(
            Row(
                f"ingest {size // MiB} MiB raw body, offload mode vs durable nginx",
                "MiB/s",
                "nginx writes, qproxy hashes + fsyncs + renames",
                "nginx body to disk + fsync (no hash)",
            ),
            ocand,
            lambda: b.curl_upload(durable + "/raw/big.bin", path, raw=True),
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
        before = _status_kib(child, "VmRSS")
        b.curl_upload(url + "/upload", path)
        peak = _status_kib(child, "VmHWM")
        b.clean_local()
        growth = max(0.0, (peak - before) / 1024)
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


def resolve_rows(b: Bench) -> None:
    seconds = 2 if b.quick else 8
    stack = b.stack
    node_root = Path(stack.env["QPROXY_LOCAL_ROOT"])
    data = os.urandom(64 * 1024)
    r = httpx.post(stack.front + "/upload", files={"file": ("bench.bin", data)})
    r.raise_for_status()
    key = r.json()["keys"][0]
    stack.services["worker"].signal(signal.SIGSTOP)  # keep it local for this row
    try:
        xaccel = stack.front
        auth = b.nginx(
            "nginx-auth",
            full_config(
                stack.config,
                NginxOptions(
                    listen="127.0.0.1:{port}",
                    app=stack.url("app"),
                    resolver=stack.url("resolver"),
                    mode="auth_request",
                ),
            ),
        )
        bare = b.uvicorn("bare-resolver", "bench.apps:bare_resolver")
        bare_ngx = b.nginx(
            "nginx-bare",
            full_config(
                stack.config,
                NginxOptions(listen="127.0.0.1:{port}", app=stack.url("app"), resolver=bare),
            ),
        )
        static = b.nginx("nginx-static", NGINX_STATIC.replace("{root}", str(node_root) + "/"))
        micro = {
            mode: b.nginx(
                f"nginx-micro-{mode}",
                full_config(
                    stack.config,
                    NginxOptions(
                        listen="127.0.0.1:{port}",
                        app=stack.url("app"),
                        resolver=stack.url("resolver"),
                        mode=mode,
                        micro_cache=True,
                        micro_cache_listen=f"unix:{b.tmp}/hop-{mode}.sock",
                    ),
                ),
            )
            for mode in ("x-accel", "auth_request")
        }
        urls = {
            "xaccel": f"{xaccel}/media/{key}",
            "auth": f"{auth}/media/{key}",
            "xaccel-micro": f"{micro['x-accel']}/media/{key}",
            "auth-micro": f"{micro['auth_request']}/media/{key}",
            "bare": f"{bare_ngx}/media/{key}",
            "static": f"{static}/static/{key}",
        }
        results: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
        for _ in range(b.rounds):
            for name, url in urls.items():
                results[name].append(b.wrk(url, seconds))
        for name, label, target, what in (
            ("xaccel", "X-Accel mode", 0.25, "cold"),
            ("auth", "auth_request mode", 0.25, "cold"),
            ("xaccel-micro", "X-Accel mode, hot key, micro-cache", 0.7, "hot"),
            ("auth-micro", "auth_request mode, hot key, micro-cache", 0.7, "hot"),
        ):
            row = Row(
                f"resolve + serve 64 KiB local, {label}",
                "req/s",
                f"qproxy resolver ({label})",
                "nginx static",
                cand=[x["rps"] for x in results[name]],
                base=[x["rps"] for x in results["static"]],
                target=f">= {target}x static ({what})",
                target_ratio=target,
            )
            row.note = (
                f"p50 {statistics.median(x['p50'] for x in results[name]):.1f} ms, "
                f"p99 {statistics.median(x['p99'] for x in results[name]):.1f} ms; static p99 "
                f"{statistics.median(x['p99'] for x in results['static']):.1f} ms"
            )
            b.rows.append(row)
            print(f"  {row.name}: {fmt(row)}", flush=True)
        row = Row(
            "resolve + serve 64 KiB local, vs bare Starlette",
            "req/s",
            "qproxy resolver (X-Accel)",
            "bare Starlette X-Accel (no Redis)",
            cand=[x["rps"] for x in results["xaccel"]],
            base=[x["rps"] for x in results["bare"]],
        )
        b.rows.append(row)
        print(f"  {row.name}: {fmt(row)}", flush=True)
        for name in (
            "nginx-auth",
            "bare-resolver",
            "nginx-bare",
            "nginx-static",
            "nginx-micro-x-accel",
            "nginx-micro-auth_request",
        ):
            b.stop(name)
    finally:
        stack.services["worker"].signal(signal.SIGCONT)

    # Remote: 302s per second straight from the resolver.
    r = httpx.post(stack.front + "/upload", files={"file": ("remote.bin", data)})
    rkey = r.json()["keys"][0]

    node = Stores(stack.config)
    deadline = time.monotonic() + 60
    while (rec := node.state.get(rkey)) is None or rec.state != "remote":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    public = b.serve(
        "resolver-public",
        [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1", "--port", "{port}"],
        "/metrics",
        env={"QPROXY_REDIRECT": "public", "QPROXY_REMOTE_BASE_URL": "https://cdn.example"},
    )
    bare = b.uvicorn("bare-302", "bench.apps:bare_resolver")
    runs: dict[str, list[float]] = {"presigned": [], "public": [], "bare": []}
    for _ in range(b.rounds):
        runs["presigned"].append(b.wrk(f"{stack.url('resolver')}/resolve/{rkey}", seconds)["rps"])
        runs["public"].append(b.wrk(f"{public}/resolve/{rkey}", seconds)["rps"])
        runs["bare"].append(b.wrk(f"{bare}/redirect/{rkey}", seconds)["rps"])
    for mode, target in (("presigned", 0.5), ("public", None)):
        row = Row(
            f"resolve remote (302/s), {mode}",
            "req/s",
            f"resolver, {mode}",
            "bare Starlette 302",
            cand=runs[mode],
            base=runs["bare"],
            target=">= 0.5x bare" if target else "",
            target_ratio=target,
        )
        b.rows.append(row)
        print(f"  {row.name}: {fmt(row)}", flush=True)
    b.stop("resolver-public")
    b.stop("bare-302")


def transfer_row(b: Bench) -> None:
    import boto3

    size = (8 if b.quick else 256) * MiB
    path = b.big_file(size)
    node = Stores(b.stack.config)
    s3 = boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")

    def cand() -> float:
        temp = node.local.create_temp()
        with open(path, "rb") as fh:
            while chunk := fh.read(MiB):
                temp.write(chunk)
        temp.close()
        key = "bench/t-" + os.urandom(6).hex() + ".bin"
        started = time.monotonic()
        commit(node, temp, key, {"filename": "t.bin", "content_type": "application/octet-stream"})
        while (rec := node.state.get(key)) is None or rec.state != "remote":
            time.sleep(0.02)
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key=key)
        node.local.remove(key)
        return rate

    def base() -> float:
        started = time.monotonic()
        s3.upload_file(str(path), "qproxy-dev", "bench/raw")
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key="bench/raw")
        return rate

    b.alternate(
        Row(
            f"transfer {size // MiB} MiB to S3",
            "MiB/s",
            "worker end to end (queue -> verified -> remote)",
            "boto3 upload_file",
            target=">= 0.8x boto3",
            target_ratio=0.8,
        ),
        cand,
        base,
    )


def transfer_many_row(b: Bench) -> None:
    """Many small files: the worker pool end to end against a put_object loop."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    count = 40 if b.quick else 1000
    width = b.stack.worker_concurrency
    node = Stores(b.stack.config)
    s3 = boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")
    payload = os.urandom(64 * 1024)
    worker = b.stack.services["worker"]

    def cand() -> float:
        keys = []
        worker.signal(signal.SIGSTOP)  # queue them all first: measure the pool, not intake
        try:
            for _ in range(count):
                temp = node.local.create_temp()
                temp.write(payload)
                temp.close()
                key = "bench/many-" + os.urandom(6).hex() + ".bin"
                commit(
                    node,
                    temp,
                    key,
                    {"filename": "m.bin", "content_type": "application/octet-stream"},
                )
                keys.append(key)
        finally:
            started = time.monotonic()
            worker.signal(signal.SIGCONT)
        pending = list(keys)
        while pending:
            states = StateStore.from_url(b.stack.config.redis_url).states(pending)
            pending = [k for k, st in zip(pending, states, strict=True) if st != "remote"]
            time.sleep(0.05)
        rate = count / (time.monotonic() - started)
        for key in keys:
            s3.delete_object(Bucket="qproxy-dev", Key=key)
            node.local.remove(key)
        return rate

    def base() -> float:
        names = [f"bench/raw-{i}" for i in range(count)]
        started = time.monotonic()
        with ThreadPoolExecutor(width) as pool:
            list(pool.map(lambda n: s3.put_object(Bucket="qproxy-dev", Key=n, Body=payload), names))
        rate = count / (time.monotonic() - started)
        for name in names:
            s3.delete_object(Bucket="qproxy-dev", Key=name)
        return rate

    b.alternate(
        Row(
            f"transfer {count:,} files of 64 KiB",
            "files/s",
            f"worker pool ({width} processes), end to end",
            f"put_object loop, {width} threads",
            target=">= 0.7x",
            target_ratio=0.7,
        ),
        cand,
        base,
    )


def state_row(b: Bench) -> None:
    import redis as redis_lib

    n = 20_000 if b.quick else 1_000_000
    stuck = 100 if b.quick else 1000
    port = free_port()
    data = b.tmp / "redis-scale"
    data.mkdir(exist_ok=True)
    b.stack.spawn(
        "redis-scale",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    b.stack.wait_for("redis-scale", lambda: bool(client.ping()))
    state = StateStore.from_url(url)
    node = Stores(b.stack.config.replace(redis_url=url), state=state, queue=_NullQueue())
    before = int(client.info("memory")["used_memory"])
    now = time.time()
    # The fields a real upload's record has: written by the commit, then changed by the
    # worker (transferring, remote) and the origin's drop of its copy.
    fields = {
        "node": "node-1",
        "node_url": "http://10.0.0.1:8300",
        "size": 123456,
        "sha256": hashlib.sha256(b"x").hexdigest(),
        "has_local": True,
        "filename": "holiday-photo.jpg",
        "content_type": "image/jpeg",
    }
    done = {
        "lease": "",
        "lease_until": "",
        "error": "",
        "attempts": 1,
        "remote_at": now,
        "has_remote": True,
        "node_url": "",
        "has_local": False,
    }
    batch = 2000
    for start in range(0, n, batch):
        with state.bulk() as bulk:
            for i in range(start, min(n, start + batch)):
                key = f"2026/11/26/{i:024d}.jpg"
                if i < stuck:
                    bulk.create(key, "queued", fields, now=now - 3600)
                    continue
                bulk.create(key, "local", fields, now=now)
                bulk.transition(key, "remote", fields=done, now=now)
    after = int(client.info("memory")["used_memory"])
    per_record = (after - before) / n
    started = time.monotonic()
    requeued = requeue_stuck(node, older_than=now - 600, now=now, limit=stuck * 2)
    sweep_s = time.monotonic() - started
    assert requeued == stuck, requeued
    row = Row(
        f"state at scale ({n:,} records, {stuck:,} stuck)",
        "B/record",
        "Redis memory per record",
        "-",
        cand=[per_record],
        higher_is_better=False,
        target="<= 300 B/record; sweep <= 1 s",
    )
    row.note = (
        f"sweep of the stuck: {sweep_s * 1000:.0f} ms ({'met' if sweep_s <= 1 else 'MISSED'}); "
        f"memory {'met' if per_record <= 300 else 'MISSED'}"
    )
    b.rows.append(row)
    print(f"  {row.name}: {per_record:.0f} B/record, sweep {sweep_s * 1000:.0f} ms", flush=True)
    b.stop("redis-scale")


class _NullQueue:
    def enqueue_transfer(self, key: str, gen: int) -> None:
        pass

    def enqueue_delete(self, key: str, gen: int) -> None:
        pass


NGINX_BODY = """
worker_processes 1;
pid nginx.pid;
error_log error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path proxy_temp; fastcgi_temp_path fastcgi_temp; uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    client_max_body_size 0;
    server {
        listen 127.0.0.1:{port};
        location = / { return 200 "ok"; }
        location = /ok { return 200 "ok"; }
        # nginx reads the whole body into a file (the ceiling), then answers.
        location = /upload {
            client_body_in_file_only clean;
            client_body_buffer_size 1m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:{port}/ok;
        }
    }
}
"""

NGINX_STATIC = """
worker_processes auto;
pid nginx.pid;
error_log error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path cb; proxy_temp_path pt; fastcgi_temp_path ft; uwsgi_temp_path ut;
    scgi_temp_path st;
    sendfile on;
    server {
        listen 127.0.0.1:{port};
        location = / { return 200 "ok"; }
        # The same open-file cache the micro-cached qproxy config uses: a fair ceiling.
        location /static/ {
            alias {root};
            open_file_cache max=10000 inactive=30s;
            open_file_cache_valid 1s;
        }
    }
}
"""


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


ROWS: dict[str, Callable[[Bench], None]] = {
    "upload": upload_rows,
    "memory": memory_row,
    "latency": latency_row,
    "resolve": resolve_rows,
    "servers": servers_row,
    "transfer": transfer_row,
    "transfer-many": transfer_many_row,
    "state": state_row,
}


def write_results(b: Bench, started: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "rounds": b.rounds,
        "quick": b.quick,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "latest.json").write_text(
        json.dumps({"meta": meta, "rows": [r.as_dict() for r in b.rows]}, indent=2)
    )
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, "
        f"{b.rounds} rounds each, more where a row says so (medians; spread min-max).",
        "",
        "| what | candidate | baseline | candidate | baseline | ratio | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in b.rows:
        c = _cell(r.cand, r.unit)
        base = _cell(r.base, r.unit) if r.base else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        verdict = "" if r.met is None else ("met" if r.met else "**missed**")
        note = f" {r.note}" if r.note else ""
        lines.append(
            f"| {r.name} | {r.candidate} | {r.baseline} | {c} | {base} | {ratio} | {r.target} | {verdict}{note} |"
        )
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _charts(b.rows, _title(meta), out)


def _cell(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    spread = f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
    return f"{med:.1f} {unit}{spread}"


def _charts(rows: list[Row], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.ratio is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.42 * len(rows)))
    names = [r.name for r in rows]
    ratios = [r.ratio or 0 for r in rows]
    colors = ["#999" if r.met is None else "#2a7" if r.met else "#c33" for r in rows]
    ax.barh(names, ratios, color=colors)
    for i, r in enumerate(rows):
        ax.text((r.ratio or 0) + 0.03, i, f"{r.ratio:.2f}x", va="center", fontsize=8)
        if r.target_ratio:
            ax.plot(
                [r.target_ratio, r.target_ratio], [i - 0.4, i + 0.4], color="black", linewidth=2
            )
    ax.axvline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel(
        "candidate / baseline, measured in the same run\n"
        "black: target; green met, red missed, grey no target; latency: lower is better"
    )
    ax.set_title(title, fontsize=10)
    fig.savefig(out / "ratios.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def redraw(out: Path) -> None:
    """The chart again from ``latest.json`` (no measuring)."""
    data = json.loads((out / "latest.json").read_text())
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
    _charts(rows, _title(data["meta"]), out)


def _title(meta: dict[str, Any]) -> str:
    return f"qproxy benchmarks, {meta['date']}, {meta['machine']}, Python {meta['python']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="draw the chart again from latest.json, measure nothing",
    )
    parser.add_argument("--only", action="append", choices=sorted(ROWS), help="run only these rows")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where results go (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.redraw:
        redraw(args.out)
        return 0
    rounds = 1 if args.quick else args.rounds
    started = time.monotonic()
    for name, value in AWS_TEST_ENV.items():  # moto's throwaway credentials
        os.environ.setdefault(name, value)
    b = Bench(quick=args.quick, rounds=rounds)
    print(f"starting the stack in {b.tmp}", flush=True)
    with b.stack:
        for name in args.only or list(ROWS):
            print(f"[{name}]", flush=True)
            ROWS[name](b)
        write_results(b, started, args.out)
    subprocess.run(["rm", "-rf", str(b.tmp)], check=False)
    return 0
