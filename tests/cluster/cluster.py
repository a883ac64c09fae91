"""A qproxy cluster on network namespaces: Redis and S3 on one host, two web nodes (resolver,
app, nginx each), a worker host, and a client host for the test's own requests.

Every node's local root is the same path, ``ROOT``, bind-mounted in each process's own
mount namespace over that node's folder: a process of one host that opened another host's
files by path would find its own (the worker host's is empty), so a transfer that works
proves the worker pulled the file over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import redis

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.dev.devstack import AWS_TEST_ENV, Service, find_redis
from qproxy.ops.nginx import NginxOptions, find_nginx, full_config
from qproxy.stores.local import LocalStore
from tests.cluster.net import Host, Net

REPO = Path(__file__).resolve().parents[2]
NGINX_PORT = 8080
RESOLVER_PORT = 8300
SENTINEL_MASTER = "qpmaster"
APP_PORT = 8000


@dataclass
class Node:
    """A web node: its host, its id, its own folder behind ROOT."""

    host: Host
    id: str
    files: Path
    env: dict[str, str]

    @property
    def front(self) -> str:
        return f"http://{self.host.address}:{NGINX_PORT}"

    @property
    def config(self) -> Config:
        return Config.from_env(self.env)


@dataclass
class Cluster:
    net: Net
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qpcluster-")))
    services: dict[str, Service] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    sentinels: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.chmod(self.base, 0o755)  # nginx's workers (nobody) walk down to the files
        self.root = self.base / "root"
        self.root.mkdir()
        os.chmod(self.root, 0o755)
        self.data = self.net.add("data", 10)
        self.client = self.net.add("client", 50)

    # -- settings -------------------------------------------------------------------------

    def common_env(self) -> dict[str, str]:
        return {
            **AWS_TEST_ENV,
            "PYTHONPATH": str(REPO),
            # Through the sentinels: every process finds the master, and finds it again.
            "QPROXY_REDIS_URL": "redis+sentinel://"
            + ",".join(f"10.233.0.{n}:26379" for n in (10, 13, 14))
            + f"/{SENTINEL_MASTER}/0",
            "QPROXY_S3_BUCKET": "qproxy-cluster",
            "QPROXY_S3_ENDPOINT_URL": f"http://{self.data.address}:9000",
            "QPROXY_S3_REGION": "us-east-1",
            "QPROXY_LOCAL_ROOT": str(self.root),
            "QPROXY_SECRET": "cluster-test-secret-0123456789",
            "QPROXY_JANITOR_INTERVAL": "1",
            "QPROXY_RETRY_BACKOFF": "0.5",
            "QPROXY_RETRY_BACKOFF_MAX": "2",
            "QPROXY_TRANSFER_RETRIES": "2",
            "QPROXY_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
            # Resumable uploads; the test app logs the key each completed one got.
            "QPROXY_TUS_PATH": "/tus/",
            "QP_TUS_LOG": str(self.base / "tus-completed.jsonl"),
        }

    def test_config(self) -> Config:
        """This process's view (it uses addresses, not the hosts' names)."""
        return Config.from_env(self.common_env())

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        host: Host,
        argv: list[str],
        env: dict[str, str],
        *,
        files: Path | None = None,
    ) -> Service:
        """Run ``argv`` on ``host``; with ``files``, ROOT is that folder for it alone."""
        log_path = self.base / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(host, argv, files),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                cwd=self.base,
                start_new_session=True,
            )
        service = Service(name, argv, process, log_path)
        self.services[name] = service
        return service

    def command(self, host: Host, argv: list[str], files: Path | None = None) -> list[str]:
        command = host.exec
        if files is not None:
            command += [
                "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "qp",
                str(files), str(self.root),
            ]  # fmt: skip
        return command + argv

    def qproxy(self, node: Node, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``qproxy ARGS`` on ``node``, as its operator would run it there."""
        return subprocess.run(
            self.command(node.host, [sys.executable, "-m", "qproxy", *args], node.files),
            env={**os.environ, **node.env, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )

    def wait(self, name: str, host: Host, check: Callable[[], bool], timeout: float = 60) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{name} exited:\n{service.log_tail()}")
            with contextlib.suppress(Exception):
                if host.run(check):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready in {timeout}s:\n{service.log_tail()}")

    def start_data(self) -> None:
        """Redis as a cluster runs it: a master (on ``data``), a replica (``data2``) and
        three sentinels (``data``, ``data2``, ``arbiter``); S3 on ``data``."""
        redis_server = find_redis()
        assert redis_server is not None
        replica_host = self.net.add("data2", 13)
        arbiter = self.net.add("arbiter", 14)
        for name, host, extra in (
            ("redis", self.data, []),
            ("redis-replica", replica_host, ["--replicaof", self.data.address, "6379"]),
        ):
            folder = self.base / name
            folder.mkdir()
            argv = [redis_server, "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no"]
            argv += ["--dir", str(folder), "--appendonly", "yes", "--save", ""]
            argv += ["--maxmemory-policy", "noeviction", *extra]
            self.spawn(name, host, argv, {})
        for i, host in enumerate((self.data, replica_host, arbiter)):
            folder = self.base / f"sentinel{i}"
            folder.mkdir()
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port 26379\nbind 0.0.0.0\nprotected-mode no\ndir {folder}\n"
                f"sentinel monitor {SENTINEL_MASTER} {self.data.address} 6379 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
            )
            self.spawn(f"sentinel{i}", host, [redis_server, str(conf), "--sentinel"], {})
            self.sentinels.append(host)

        def replicating() -> bool:
            return bool(redis.Redis().info("replication")["master_link_status"] == "up")

        self.wait("redis-replica", replica_host, replicating)
        for i, host in enumerate(self.sentinels):

            def knows(address: str = host.address) -> bool:
                seen = redis.Redis(host=address, port=26379).sentinel_master(SENTINEL_MASTER)
                return bool(seen["num-slaves"] >= 1 and seen["num-other-sentinels"] >= 2)

            self.wait(f"sentinel{i}", self.client, knows)
        argv = [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", "9000"]
        self.spawn("s3", self.data, argv, {})
        self.wait("s3", self.data, lambda: httpx.get("http://127.0.0.1:9000/moto-api/").is_success)

        def bucket() -> None:
            boto3.client(
                "s3", endpoint_url="http://127.0.0.1:9000", region_name="us-east-1"
            ).create_bucket(Bucket="qproxy-cluster")

        os.environ.update(AWS_TEST_ENV)
        self.data.run(bucket)

    def add_node(self, name: str, last_octet: int, *, url_host: str | None = None) -> Node:
        host = self.net.add(name, last_octet)
        files = self.base / f"{name}-files"
        files.mkdir()
        os.chmod(files, 0o755)
        env = {
            **self.common_env(),
            "QPROXY_NODE_ID": name,
            # By name: every host resolves it from its /etc/hosts (tests/cluster/net.py).
            "QPROXY_NODE_URL": f"http://{url_host or name}:{RESOLVER_PORT}",
            # Each node's processes sum their metrics in a folder of its own.
            "PROMETHEUS_MULTIPROC_DIR": str(self.base / f"{name}-metrics"),
            # Where the other nodes send the tus requests of uploads this node holds.
            "QPROXY_NODE_TUS_URL": f"http://{name}:{NGINX_PORT}",
        }
        node = Node(host, name, files, env)
        self.nodes[name] = node
        return node

    def start_node(self, node: Node, *, mode: str = "x-accel") -> None:
        name = node.id
        LocalStore(node.files, node_id=name).ensure()
        argv = [sys.executable, "-m", "qproxy", "resolver", "--port", str(RESOLVER_PORT)]
        self.spawn(f"{name}-resolver", node.host, argv, node.env, files=node.files)
        argv = [
            sys.executable, "-m", "qproxy.dev.devserver", "tests.apps:make_app",
            "--port", str(APP_PORT),
        ]  # fmt: skip
        self.spawn(f"{name}-app", node.host, argv, node.env, files=node.files)
        prefix = self.base / f"{name}-nginx"
        prefix.mkdir()
        os.chmod(prefix, 0o755)
        options = NginxOptions(
            listen=f"0.0.0.0:{NGINX_PORT}",
            app=f"http://127.0.0.1:{APP_PORT}",
            resolver=f"http://127.0.0.1:{RESOLVER_PORT}",
            mode=mode,  # type: ignore[arg-type]
            # The other nodes by name (--peer): connections kept open, resolved at start.
            peers=tuple(n.env["QPROXY_NODE_URL"] for n in self.nodes.values() if n is not node),
        )
        (prefix / "nginx.conf").write_text(full_config(node.config, options))
        nginx = find_nginx()
        assert nginx is not None
        argv = [nginx, "-p", str(prefix), "-c", "nginx.conf", "-e", "stderr", "-g", "daemon off;"]
        self.spawn(f"{name}-nginx", node.host, argv, node.env, files=node.files)
        here = f"http://127.0.0.1:{RESOLVER_PORT}/metrics"
        self.wait(f"{name}-resolver", node.host, lambda: httpx.get(here).is_success)
        self.wait(
            f"{name}-app",
            node.host,
            lambda: httpx.get(f"http://127.0.0.1:{APP_PORT}/").status_code < 500,
        )
        self.wait(
            f"{name}-nginx",
            node.host,
            lambda: httpx.get(f"http://127.0.0.1:{NGINX_PORT}/").status_code < 500,
        )

    def start_worker(self, name: str = "work", last_octet: int = 21) -> Path:
        """A worker host with an empty folder of its own behind ROOT."""
        host = self.net.hosts.get(name) or self.net.add(name, last_octet)
        files = self.base / f"{name}-files"
        files.mkdir(exist_ok=True)
        env = {**self.common_env(), "QPROXY_NODE_ID": name}
        argv = [
            sys.executable, "-m", "qproxy", "worker", "--concurrency", "2",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"{name}@%h",
        ]  # fmt: skip
        service = self.spawn(name, host, argv, env, files=files)
        deadline = time.monotonic() + 60
        while b"ready." not in service.log_path.read_bytes():
            if not service.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{service.log_tail()}")
            time.sleep(0.2)
        return files

    def stores(self) -> Stores:
        return Stores(self.test_config())

    def stop(self) -> None:
        for name in reversed(list(self.services)):
            self.services.pop(name).stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def cluster(net: Net) -> Iterator[Cluster]:
    made = Cluster(net)
    try:
        yield made
    finally:
        made.stop()
