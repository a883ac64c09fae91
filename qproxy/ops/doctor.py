"""``qproxy doctor``: checks this node's setup the way it will be used, and says what to fix.

Each check is a plain function returning a :class:`Check`; nothing here changes state
except a probe object written to S3 and a probe file in the local root (both removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal
from urllib.parse import urlsplit

import httpx
import redis

from qproxy.config import Config
from qproxy.errors import QProxyError
from qproxy.stores.local import LocalStore
from qproxy.stores.state import StateStore, redis_client

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def check_secret(config: Config) -> Check:
    if not config.secret:
        return Check(
            "secret",
            "fail",
            "QPROXY_SECRET is empty: signed peer URLs and offload mode cannot work. Set it to "
            "the same long random value on every node.",
        )
    if len(config.secret) < 16:
        return Check("secret", "warn", "QPROXY_SECRET is short (under 16 characters)")
    return Check("secret", "ok", "set")


def check_local(config: Config) -> Check:
    store = LocalStore(config.local_path, node_id=config.node_id)
    try:
        store.ensure()
        probe = store.create_temp()
        probe.write(b"qproxy doctor")
        probe.close()
        probe.discard()
    except (OSError, QProxyError) as exc:
        return Check("local root", "fail", f"{config.local_path}: cannot write: {exc}")
    free = shutil.disk_usage(config.local_path).free
    detail = f"{config.local_path} writable, {free / 2**30:.1f} GiB free"
    # nginx's workers (often `nobody`) must reach every file: each folder on the way needs
    # the execute bit for others.
    closed = [
        str(p)
        for p in [config.local_path, *config.local_path.parents]
        if not os.stat(p).st_mode & 1
    ]
    if closed:
        return Check("local root", "warn", f"{detail}; not traversable by nginx: {closed[0]}")
    if free < config.max_upload_bytes:
        return Check("local root", "warn", f"{detail}: less than one maximal upload")
    return Check("local root", "ok", detail)


def _redis(url: str) -> redis.Redis:
    return redis_client(url, socket_timeout=3, socket_connect_timeout=3)


def check_redis(config: Config) -> Iterator[Check]:
    client = _redis(config.redis_url)
    try:
        info = client.info()
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "")
        aof = client.config_get("appendonly").get("appendonly", "")
    except redis.ResponseError:  # CONFIG disabled (managed Redis): report what INFO says
        policy, aof = "", ""
    except redis.RedisError as exc:
        yield Check("redis", "fail", f"{config.redis_url}: {exc}")
        return
    finally:
        client.close()
    yield Check("redis", "ok", f"{config.redis_url}: Redis {info.get('redis_version', '?')}")
    if aof and aof != "yes":
        yield Check(
            "redis durability",
            "warn",
            "appendonly is off: a Redis crash loses recent records and queued jobs "
            "(the journal and `qproxy reconcile` recover files, not the queue's timing)",
        )
    if policy and policy != "noeviction":
        yield Check(
            "redis eviction",
            "fail",
            f"maxmemory-policy is {policy}: Redis may evict file records; use noeviction",
        )


def check_broker(config: Config) -> Check:
    if config.broker == config.redis_url:
        return Check("broker", "ok", "same Redis as the state")
    client = _redis(config.broker)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("broker", "fail", f"{config.broker}: {exc}")
    finally:
        client.close()
    return Check("broker", "ok", config.broker)


def check_s3(config: Config) -> Check:
    from qproxy.stores.s3 import RemoteStore

    remote = RemoteStore(config)
    where = f"s3://{config.s3_bucket}/{config.s3_prefix}"
    data = b"qproxy doctor probe\n"
    name = f".qproxy-doctor/{config.node_id}-{os.urandom(4).hex()}"
    try:
        if not remote.ping():
            return Check("s3", "fail", f"{where}: bucket not found or not allowed")
        started = time.monotonic()
        sha = hashlib.sha256(data).hexdigest()
        remote.store(name, io.BytesIO(data), size=len(data), sha256=sha, content_type="text/plain")
        remote.delete(name)
        ms = (time.monotonic() - started) * 1000
    except QProxyError as exc:
        return Check("s3", "fail", f"{where}: {exc}")
    except Exception as exc:  # botocore's own (credentials, endpoint) errors
        return Check("s3", "fail", f"{where}: {type(exc).__name__}: {exc}")
    return Check("s3", "ok", f"{where}: verified put and delete in {ms:.0f} ms")


def check_workers(config: Config) -> Check:
    from qproxy.stores.queue import celery_app

    app = celery_app(config)
    try:
        replies = app.control.ping(timeout=1.5)
    except Exception as exc:
        return Check("workers", "fail", f"cannot ask the broker: {exc}")
    if not replies:
        return Check(
            "workers",
            "warn",
            "no Celery worker answered: files stay local until `qproxy worker` runs",
        )
    return Check("workers", "ok", f"{len(replies)} answering")


def check_nginx(config: Config) -> Check:
    from qproxy.ops.nginx import find_nginx

    path = find_nginx()
    if path is None:
        return Check(
            "nginx", "warn", "not installed here (serve with `qproxy resolver --standalone`)"
        )
    return Check("nginx", "ok", f"{path} (print a config with `qproxy nginx-config`)")


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _other_nodes(config: Config) -> list[str]:
    """The other registered web nodes (none when Redis cannot say)."""
    with contextlib.suppress(QProxyError, ValueError):
        state = StateStore(_redis(config.redis_url))
        return sorted(n for n in state.nodes() if n != config.node_id)
    return []


def check_node_url(config: Config) -> Check:
    """The other nodes and the workers fetch this node's files at QPROXY_NODE_URL: it must
    be reachable, and not loopback on a cluster."""
    url = config.node_url
    others = _other_nodes(config)
    if others and _is_loopback_url(url):
        return Check(
            "node url",
            "fail",
            f"QPROXY_NODE_URL is {url}, a loopback URL, but other nodes are registered "
            f"({', '.join(others[:5])}): they and the workers cannot fetch this node's files "
            "there. Set it to this node's own address, e.g. http://10.0.0.21:8300",
        )
    try:
        answer = httpx.get(url.rstrip("/") + "/internal/blob/qproxy-doctor", timeout=2.0)
    except httpx.HTTPError as exc:
        return Check(
            "node url",
            "fail",
            f"cannot reach this node's resolver at QPROXY_NODE_URL {url}: "
            f"{type(exc).__name__}: {exc} (is `qproxy resolver` running? It listens on "
            "0.0.0.0 unless QPROXY_NODE_URL is a loopback URL or --host says otherwise)",
        )
    if answer.status_code not in (403, 404):
        return Check(
            "node url",
            "warn",
            f"{url} answered {answer.status_code}: is it this node's qproxy resolver?",
        )
    peers = f"; {len(others)} other node(s) registered" if others else ""
    return Check("node url", "ok", f"{url} reachable{peers}")


def check_tus_url(config: Config) -> Iterator[Check]:
    """With tus on, the other nodes send on requests for this node's uploads to its nginx
    at QPROXY_NODE_TUS_URL: it must answer tus there, and not be loopback on a cluster."""
    if not config.tus_path:
        return
    url = config.tus_url
    others = _other_nodes(config)
    if others and _is_loopback_url(url):
        yield Check(
            "tus url",
            "fail",
            f"QPROXY_NODE_TUS_URL is {url}, a loopback URL, but other nodes are registered "
            f"({', '.join(others[:5])}): tus requests they get for this node's uploads "
            "cannot reach it. Set it to where they reach this node's nginx",
        )
        return
    try:
        answer = httpx.options(url + config.tus_path, timeout=2.0)
    except httpx.HTTPError as exc:
        yield Check(
            "tus url",
            "fail",
            f"cannot reach this node's nginx at QPROXY_NODE_TUS_URL {url}: "
            f"{type(exc).__name__}: {exc} (set it to where other nodes reach this node's "
            "nginx; the default is QPROXY_NODE_URL's host on port 80)",
        )
        return
    if "tus-version" not in answer.headers:
        yield Check(
            "tus url",
            "fail",
            f"OPTIONS {url}{config.tus_path} answered {answer.status_code} without "
            "Tus-Version: is it this node's nginx, with `qproxy nginx-config`'s tus location?",
        )
        return
    yield Check("tus url", "ok", f"{url}{config.tus_path} answers tus")


CHECKS: tuple[Callable[[Config], Check | Iterator[Check]], ...] = (
    check_secret,
    check_local,
    check_redis,
    check_broker,
    check_s3,
    check_workers,
    check_node_url,
    check_tus_url,
    check_nginx,
)


def run_checks(config: Config) -> list[Check]:
    out: list[Check] = []
    for check in CHECKS:
        result = check(config)
        out.extend([result] if isinstance(result, Check) else result)
    return out
