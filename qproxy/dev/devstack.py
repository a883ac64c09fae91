"""A whole qproxy stack on one machine, from real parts, on free loopback ports.

``qproxy demo`` and the test suite both use it: a private redis-server (AOF on,
noeviction), moto's S3 server, a Celery worker, the resolver under uvicorn, a WSGI app
wrapped in the middleware, and nginx with the config ``qproxy nginx-config --full`` makes.
Every process gets its own process group, so stopping the stack leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from qproxy.config import Config
from qproxy.ops.nginx import Mode, NginxOptions, find_nginx, full_config
from qproxy.stores.local import LocalStore

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "qproxy-dev",
    "AWS_SECRET_ACCESS_KEY": "qproxy-dev-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class StackError(RuntimeError):
    """A part of the stack did not start."""


# free_port()'s ports: below the kernel's ephemeral range, in a share of their own for each
# pytest-xdist worker (slot 0: any other process).
_PORTS_FROM = 10_000
_PORT_SLOTS = 8
_handed_out: set[int] = set()
_next_port = itertools.count(secrets.randbelow(1 << 16))


def _port_share() -> range:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    top = max(ephemeral, _PORTS_FROM + _PORT_SLOTS * 100)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    slot = int(worker[2:]) + 1 if worker[:2] == "gw" and worker[2:].isdigit() else 0
    width = (top - _PORTS_FROM) // _PORT_SLOTS
    start = _PORTS_FROM + slot % _PORT_SLOTS * width
    return range(start, start + width)


def free_port() -> int:
    """A loopback port nobody listens on, not handed out before by this process.

    Not the kernel's ``bind(0)``: a port it gives is free again once the probe closes, so
    two calls before either service binds can get the same one (seen: S3 and the app of
    one stack on one port, the app's requests answered by moto), and an outgoing
    connection may take it meanwhile. These come from below the ephemeral range, from a
    share of their own for each xdist worker, and each only once while the share lasts.
    """
    share = _port_share()
    if len(_handed_out) >= len(share):
        _handed_out.clear()  # a share used up: ports of stacks long stopped are free again
    for _ in range(len(share)):
        port = share[next(_next_port) % len(share)]
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or in TIME_WAIT): someone else's
        _handed_out.add(port)
        return port
    raise StackError(f"no free port in {share.start}-{share.stop - 1}")


def find_redis() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


@dataclass
class Service:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            self.signal(signal.SIGKILL)  # stray children of a dead leader
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(5)
        self.signal(signal.SIGKILL)


@dataclass
class Stack:
    """Start with :meth:`start` (or use as a context manager); :meth:`stop` ends it all."""

    base: Path | None = None
    use_nginx: bool | None = None  # None: when nginx is installed
    mode: Mode = "x-accel"
    settings: dict[str, str] = field(default_factory=dict)
    app: str = "qproxy.dev.demo:make_app"
    # The app's server (qproxy.dev.devserver --server); empty: werkzeug or uvicorn.
    app_server: str = ""
    worker_concurrency: int = 2
    micro_cache: bool = False  # nginx-config --micro-cache
    offload: bool = False  # nginx-config --offload (needs QPROXY_RAW_UPLOAD_PATHS)
    services: dict[str, Service] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _own_base: bool = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="qproxy-stack-"))
            self._own_base = True
        self.base.mkdir(parents=True, exist_ok=True)
        # nginx started as root reads files as `nobody`: every folder on the way must be
        # traversable (mkdtemp makes 0700).
        os.chmod(self.base, 0o755)
        if self.use_nginx is None:
            self.use_nginx = find_nginx() is not None
        for name in ("redis", "s3", "resolver", "app", "nginx"):
            self.ports[name] = free_port()
        try:
            self.start_redis()
            self.start_s3()
            self.start_worker()
            self.start_resolver()
            self.start_app()
            if self.use_nginx:
                self.start_nginx()
        except BaseException:
            self.stop()
            raise

    def stop(self, *, keep_logs: Path | None = None) -> None:
        """Stop every service; remove the stack's folder if it made it (its logs moved to
        ``keep_logs`` first, when given)."""
        for name in reversed(list(self.services)):
            self.services.pop(name).stop()
        if keep_logs is not None and self.base is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in self.base.glob("*.log"):
                shutil.move(log, keep_logs / log.name)
        if self._own_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- configuration --------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        assert self.base is not None, "stack not started"
        return self.base

    @property
    def env(self) -> dict[str, str]:
        env = {
            "QPROXY_LOCAL_ROOT": str(self.dir / "files"),
            "QPROXY_REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "QPROXY_S3_BUCKET": "qproxy-dev",
            "QPROXY_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['s3']}",
            "QPROXY_S3_REGION": "us-east-1",
            "QPROXY_NODE_ID": "node-1",
            "QPROXY_NODE_URL": f"http://127.0.0.1:{self.ports['resolver']}",
            "QPROXY_SECRET": "qproxy-dev-secret",
            "QPROXY_JANITOR_INTERVAL": "1",
            "QPROXY_RETRY_BACKOFF": "0.5",
            "QPROXY_RETRY_BACKOFF_MAX": "5",
            # The stack's processes sum their metrics here (and never in a folder that
            # this process's environment named for another stack).
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / "metrics"),
        }
        env.update(AWS_TEST_ENV)
        env.update(self.settings)
        return env

    @property
    def config(self) -> Config:
        return Config.from_env(self.env)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def front(self) -> str:
        """Where a browser talks to: nginx, or the app itself without nginx."""
        return self.url("nginx" if self.use_nginx else "app")

    @property
    def files_url(self) -> str:
        """Where files are served: nginx, or the standalone resolver without nginx."""
        return self.url("nginx" if self.use_nginx else "resolver")

    # -- services -------------------------------------------------------------------------

    def spawn(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> Service:
        log_path = self.dir / f"{name}.log"
        full_env = {**os.environ, **self.env, **(env or {})}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=self.dir,
                start_new_session=True,
            )
        service = Service(name, list(argv), process, log_path)
        self.services[name] = service
        return service

    def wait_for(self, name: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise StackError(
                    f"{name} exited ({service.process.returncode}):\n{service.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.1)
        raise StackError(f"{name} did not become ready in {timeout:.0f}s:\n{service.log_tail()}")

    def _http_ok(self, url: str) -> bool:
        return httpx.get(url, timeout=1).status_code < 500

    def start_redis(self) -> None:
        redis_server = find_redis()
        if redis_server is None:
            raise StackError("redis-server is not installed (Debian: apt-get install redis-server)")
        data = self.dir / "redis"
        data.mkdir(exist_ok=True)
        argv = [
            redis_server,
            "--port",
            str(self.ports["redis"]),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self.spawn("redis", argv)
        self.wait_for("redis", lambda: self._redis_ping())

    def _redis_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def restart(self, name: str) -> None:
        """Stop (if running) and start one service again, on the same port and data."""
        service = self.services.pop(name, None)
        if service is not None:
            service.stop()
        starters = {
            "redis": self.start_redis,
            "s3": self.start_s3,
            "worker": self.start_worker,
            "resolver": self.start_resolver,
            "app": self.start_app,
            "nginx": self.start_nginx,
        }
        starters[name]()

    def start_s3(self) -> None:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports["s3"])]
        self.spawn("s3", argv)
        self.wait_for("s3", lambda: self._http_ok(self.url("s3") + "/moto-api/"))
        from qproxy.stores.s3 import RemoteStore

        with _env(AWS_TEST_ENV):
            RemoteStore(self.config).ensure_bucket()

    def start_worker(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "qproxy",
            "worker",
            "--concurrency",
            str(self.worker_concurrency),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"qproxy-{os.getpid()}-{time.time_ns()}@%h",
        ]
        log_path = self.dir / "worker.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.spawn("worker", argv)
        self.wait_for("worker", lambda: b"ready." in _read_from(log_path, offset), timeout=60)

    def start_resolver(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "qproxy",
            "resolver",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports["resolver"]),
        ]
        if not self.use_nginx:
            argv.append("--standalone")
        self.spawn("resolver", argv)
        self.wait_for("resolver", lambda: self._http_ok(self.url("resolver") + "/metrics"))

    def start_app(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "qproxy.dev.devserver",
            self.app,
            "--port",
            str(self.ports["app"]),
            *(["--server", self.app_server] if self.app_server else []),
        ]
        self.spawn("app", argv)
        self.wait_for("app", lambda: self._http_ok(self.url("app") + "/"))

    def nginx_conf(self) -> Path:
        options = NginxOptions(
            listen=f"127.0.0.1:{self.ports['nginx']}",
            app=self.url("app"),
            resolver=self.url("resolver"),
            mode=self.mode,
            micro_cache=self.micro_cache,
            offload=self.offload,
        )
        # nginx creates its body folder (offload) but not the folders above it.
        LocalStore(self.config.local_path).ensure()
        return self._nginx_prefix("nginx", full_config(self.config, options))

    def _nginx_prefix(self, name: str, conf_text: str) -> Path:
        prefix = self.dir / name
        prefix.mkdir(exist_ok=True)
        os.chmod(prefix, 0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(conf_text)
        return conf

    def start_nginx(self) -> None:
        self._run_nginx("nginx", self.nginx_conf(), self.url("nginx"))

    def add_nginx(self, name: str, conf_text: str, port: int = 0) -> str:
        """Another nginx beside the stack's (benchmarks, other modes); ``{port}`` in the text
        becomes a free port (or ``port``). Returns its URL."""
        port = port or free_port()
        conf = self._nginx_prefix(name, conf_text.replace("{port}", str(port)))
        url = f"http://127.0.0.1:{port}"
        self._run_nginx(name, conf, url)
        return url

    def _run_nginx(self, name: str, conf: Path, url: str) -> None:
        nginx = find_nginx()
        if nginx is None:
            raise StackError("nginx is not installed (Debian: apt-get install nginx)")
        argv = [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
        self.spawn(name, argv)
        self.wait_for(name, lambda: self._http_ok(url + "/"))


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({k: v for k, v in values.items() if k not in os.environ or not os.environ[k]})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
