"""Fixtures: real redis-server, moto's S3 server, Celery worker, uvicorn and nginx.

The stacks are started once per session (on free 127.0.0.1 ports) and torn down at the
end; tests that change state use fresh keys, so they do not interfere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.dev.devstack import AWS_TEST_ENV, Stack, free_port
from qproxy.keys import generate_key
from qproxy.lifecycle.files import store
from qproxy.ops.nginx import NginxOptions, find_nginx, full_config

ROOT = Path(__file__).resolve().parent.parent
MAX_UPLOAD = 20 * 1024 * 1024

RESOLVER = [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1", "--port", "{port}"]
# A resolver runs its node's janitor at start and every QPROXY_JANITOR_INTERVAL (10 s), and a
# delete makes the local copy due at once: a resolver started with this runs it at start
# only, so a test sees a deleted file's local copy stay until the test itself drops it.
QUIET_JANITOR = {"QPROXY_JANITOR_INTERVAL": "3600"}


def lone_node(stack: Stack, root: Path) -> tuple[Stores, dict[str, str]]:
    """A node on the stack's Redis and S3 with its own name and disk, which no janitor
    serves (the stack's resolver janitors the stack's node), and the environment for a
    resolver of its own (``QUIET_JANITOR``). Its queue sends nothing."""
    node_id = f"lone-{root.name}-{os.getpid()}"
    node = Stores(stack.config.replace(node_id=node_id, local_root=str(root)), queue=NoQueue())
    node.local.ensure()
    return node, {"QPROXY_NODE_ID": node_id, "QPROXY_LOCAL_ROOT": str(root), **QUIET_JANITOR}


@contextlib.contextmanager
def serving(
    stack: Stack,
    name: str,
    argv: Sequence[str],
    health: str,
    env: dict[str, str] | None = None,
    port: int = 0,
) -> Iterator[str]:
    """A server of the stack's for the block: ``argv`` (``{port}`` a free port, or ``port``)
    started, its URL once ``health`` answers below 500, stopped after."""
    port = port or free_port()
    stack.spawn(name, [a.replace("{port}", str(port)) for a in argv], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for(name, lambda: httpx.get(url + health).status_code < 500)
        yield url
    finally:
        stack.services.pop(name).stop()


@contextlib.contextmanager
def other_node(stack: Stack, *, via_nginx: bool = False) -> Iterator[Stores]:
    """A second web node on the stack's Redis and S3 for the block: its own disk and its own
    resolver (a real process), which its records point at; ``via_nginx``: its own nginx
    too (the shipped config), where its records point then (QPROXY_NODE_URL). Its queue
    sends nothing, and its janitor runs at start only."""
    port = free_port()
    nginx_port = free_port() if via_nginx else 0
    url = f"http://127.0.0.1:{nginx_port or port}"
    root = stack.dir / f"node2-{port}-files"
    config = stack.config.replace(local_root=str(root), node_id="node-2", node_url=url)
    node = Stores(config, queue=NoQueue())
    node.local.ensure()
    env = {"QPROXY_LOCAL_ROOT": str(root), "QPROXY_NODE_ID": "node-2", "QPROXY_NODE_URL": url}
    env.update(QUIET_JANITOR)  # its disk stays as the test leaves it
    try:
        with serving(stack, f"resolver-node2-{port}", RESOLVER, "/healthz", env, port) as resolver:
            if not via_nginx:
                yield node
                return
            options = NginxOptions(
                listen="127.0.0.1:{port}", app=stack.url("app"), resolver=resolver
            )
            name = f"nginx-node2-{nginx_port}"
            stack.add_nginx(name, full_config(config, options), port=nginx_port)
            try:
                yield node
            finally:
                stack.services.pop(name).stop()
    finally:
        # Gone, as `qproxy drain` leaves (its resolver registered it): the stack is one
        # node again for the tests after (`qproxy doctor` fails a loopback node URL when
        # other nodes are registered).
        node.state.deregister_node("node-2")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """A small filesystem of its own at ``path`` for the block (a disk to fill, a folder
    nothing else writes to); the test is skipped where none can be mounted (not root)."""
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", str(path)],
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        path.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


needs_nginx = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")


def _stack(
    mode: str = "x-accel",
    app: str = "tests.apps:make_app",
    offload: bool = False,
    app_server: str = "",
    micro_cache: bool = False,
    **settings: str,
) -> Stack:
    env = {
        "PYTHONPATH": str(ROOT),
        "QPROXY_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "QPROXY_MULTIPART_THRESHOLD": str(6 * 1024 * 1024),
        "QPROXY_MULTIPART_CHUNK": str(5 * 1024 * 1024),
        # moto says every multipart upload began in 2010: with the default age (a day) each
        # cluster sweep of a stack would abort the uploads its tests opened on purpose.
        # Tests of the age pass their own (the fault suite's stacks: 30 s).
        "QPROXY_MULTIPART_MAX_AGE": str(100 * 365 * 86400),
        **settings,
    }
    return Stack(
        mode=mode,  # type: ignore[arg-type]
        settings=env,
        app=app,
        offload=offload,
        app_server=app_server,
        micro_cache=micro_cache,
    )


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> Iterator[None]:
    # boto3 in the test process talks to moto with the same throwaway credentials.
    saved = {k: os.environ.get(k) for k in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The whole stack, nginx in X-Accel mode (or standalone where nginx is missing)."""
    with _stack() as s:
        yield s


@pytest.fixture(scope="session")
def auth_stack() -> Iterator[Stack]:
    """The whole stack with nginx in auth_request mode."""
    if find_nginx() is None:
        pytest.skip("nginx is not installed")
    with _stack("auth_request") as s:
        yield s


@pytest.fixture(params=["x-accel", "auth_request"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    name = "stack" if request.param == "x-accel" else "auth_stack"
    s: Stack = request.getfixturevalue(name)
    if request.param == "x-accel" and not s.use_nginx:
        pytest.skip("nginx is not installed")
    return s


@pytest.fixture
def node(stack: Stack) -> Stores:
    """A node in the test process, on the session stack's Redis, S3, queue and local root,
    so the stack's real worker transfers what it commits."""
    return Stores(stack.config)


@pytest.fixture
def config(node: Stores) -> Config:
    return node.config


def wait_state(node: Stores, key: str, want: str, timeout: float = 60) -> None:
    """Poll the record until it reaches ``want`` (the worker runs in another process)."""
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = node.state.get(key)
        if record is not None and record.state == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{key} never reached {want}: {record}")


class NoQueue:
    """Commit without a job, so the test drives ``transfer`` itself (no worker races it)."""

    def enqueue_transfer(self, key: str, gen: int) -> None:
        pass

    def enqueue_delete(self, key: str, gen: int) -> None:
        pass


@pytest.fixture
def quiet_node(stack: Stack) -> Stores:
    """A node on the session stack that queues no jobs: the test drives ``transfer`` itself."""
    return Stores(stack.config, queue=NoQueue())


def put_local(node: Stores, data: bytes, key: str | None = None, *, replace: bool = False) -> str:
    key = key or generate_key("f.bin")
    fields = {"filename": "f.bin", "content_type": "application/octet-stream"}
    store(node, [data], key, fields, replace=replace)
    return key
