"""What every bench row uses: the Row record, the Bench harness (stack, servers, clients,
alternating rounds) and the baseline nginx configs."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from qproxy.dev.devstack import Stack, free_port

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
        self.failed: list[dict[str, str]] = []  # rows that broke: {"row", "error"}
        self.tmp = Path(tempfile.mkdtemp(prefix="qproxy-bench-"))
        os.chmod(self.tmp, 0o755)
        self.stack = Stack(
            settings={
                "PYTHONPATH": str(ROOT),
                "QPROXY_MAX_UPLOAD_BYTES": str(2 * 1024 * MiB),
                "BENCH_SINK": str(self.tmp / "sink"),
                # The resolver rows measure it with its record cache (one row without).
                "QPROXY_RECORD_CACHE": "1",
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

    def gunicorn_sync(self, name: str, app: str, env: dict[str, str] | None = None) -> str:
        """gunicorn's default worker: sync, one request at a time."""
        argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "sync", "-b",
                "127.0.0.1:{port}", "--timeout", "300", app]  # fmt: skip
        return self.serve(name, argv, "/", env)

    def waitress(self, name: str, app: str, env: dict[str, str] | None = None) -> str:
        """waitress (it reads the whole body before it calls the app); ``app`` a factory.
        With the README's ``--recv-bytes``: waitress reads the body 1 MiB at a time."""
        return self._waitress(name, app, env, ["--recv-bytes=1048576"])

    def waitress_defaults(self, name: str, app: str, env: dict[str, str] | None = None) -> str:
        """waitress as it comes: it reads the body 8 KiB at a time."""
        return self._waitress(name, app, env, [])

    def _waitress(self, name: str, app: str, env: dict[str, str] | None, extra: list[str]) -> str:
        argv = [sys.executable, "-m", "waitress", "--listen=127.0.0.1:{port}", "--threads=4",
                "--max-request-body-size=4294967296", *extra, "--call", app]  # fmt: skip
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

    def qproxy_nginx(self, name: str, **options: Any) -> str:
        """Another nginx with the config ``qproxy nginx-config --full`` prints for the
        stack's app and resolver (``options``: NginxOptions, e.g. mode, micro_cache)."""
        from qproxy.ops.nginx import NginxOptions, full_config

        defaults = {"app": self.stack.url("app"), "resolver": self.stack.url("resolver")}
        opts = NginxOptions(listen="127.0.0.1:{port}", **{**defaults, **options})
        return self.nginx(name, full_config(self.stack.config, opts))

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
        answer = self.tmp / f"answer-{os.getpid()}"
        argv = ["curl", "-s", "-o", str(answer), "-w", "%{http_code} %{time_total}"]
        body = ["-T", str(path)] if raw else ["-F", f"file=@{path}"]
        out = subprocess.run(
            [*argv, *body, url],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout.split()
        # Which server failed, and what it said: a failed row names them.
        said = answer.read_bytes()[:300].decode(errors="replace")
        assert out[0] in ("200", "201"), f"{url} answered {out[0]} in {out[1]} s: {said!r}"
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
