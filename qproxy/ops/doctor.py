"""``qproxy doctor``: checks this node's setup the way it will be used, and says what to fix.

Each check is a plain function returning a :class:`Check`; nothing here changes state
except a probe object written to S3 and a probe file in the local root (both removed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
import redis

from qproxy.config import Config, shown_url
from qproxy.errors import QProxyError
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
    """The local root: writable, reachable by nginx, room for an upload. Changes nothing (a
    probe file is written and removed; a root that does not exist is not made)."""
    root = config.local_path
    if not root.exists():
        parent = next(p for p in root.parents if p.exists())
        if os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "local root",
                "warn",
                f"{root} does not exist yet: qproxy makes it on first start (in {parent}, "
                "which it can write)",
            )
        return Check(
            "local root",
            "fail",
            f"{root} does not exist and {parent} is not writable by this user: create it "
            f"(e.g. install -d -o qproxy -m 0755 {root})",
        )
    if not root.is_dir():
        return Check("local root", "fail", f"{root} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qproxy-doctor-", dir=root)
        try:
            os.write(fd, b"qproxy doctor")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return Check("local root", "fail", f"{root}: cannot write: {exc.strerror or exc}")
    free = shutil.disk_usage(root).free
    detail = f"{root} writable, {free / 2**30:.1f} GiB free"
    # nginx's workers (often `nobody`) must reach every file: each folder on the way needs
    # the execute bit for others.
    closed = [str(p) for p in [root, *root.parents] if not os.stat(p).st_mode & 1]
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
        yield Check("redis", "fail", f"{shown_url(config.redis_url)}: {exc}")
        return
    finally:
        client.close()
    version = info.get("redis_version", "?")
    yield Check("redis", "ok", f"{shown_url(config.redis_url)}: Redis {version}")
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
    """The Celery broker answers (asked even when it is the state's Redis)."""
    url = config.broker
    same = " (the same Redis as the state)" if url == config.redis_url else ""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix", "redis+sentinel"):
        parts = urlsplit(url)
        try:
            socket.create_connection((parts.hostname or "", parts.port or 5672), 3).close()
        except OSError as exc:
            return Check("broker", "fail", f"{shown_url(url)}: cannot connect: {exc}")
        return Check("broker", "ok", f"{shown_url(url)} accepts connections")
    client = _redis(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("broker", "fail", f"{shown_url(url)}{same}: {exc}")
    finally:
        client.close()
    return Check("broker", "ok", f"{shown_url(url)}{same} answers")


def _s3_problem(exc: BaseException, where: str, endpoint: str, doing: str) -> str:
    """What an S3 error means, for the operator: endpoint, DNS, credentials, bucket or
    permission."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            f"no AWS credentials found ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the host an IAM role"
        )
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return f"the endpoint {endpoint} did not answer in time ({doing})"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot connect to the endpoint {endpoint}: {exc.kwargs.get('error', exc)}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            return f"{where}: the bucket does not exist at {endpoint} (create it, or fix QPROXY_S3_BUCKET)"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return f"the credentials are refused ({code}): check AWS_ACCESS_KEY_ID and its secret"
        if code in ("403", "AccessDenied", "AllAccessDisabled") or status == 403:
            return (
                f"{where}: access denied while {doing} ({code}): the credentials need "
                "s3:ListBucket, s3:PutObject, s3:GetObject and s3:DeleteObject on the bucket"
            )
        if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            return f"{where}: the bucket is in another region than QPROXY_S3_REGION ({code})"
        return f"{where}: S3 answered {status} {code} while {doing}"
    return f"{where}: {type(exc).__name__}: {exc} ({doing})"


def check_s3(config: Config) -> Check:
    """A probe object written and deleted; each kind of failure named for what it is."""
    if not config.s3_bucket:
        return Check("s3", "fail", "QPROXY_S3_BUCKET is not set: files cannot leave this node")
    from qproxy.stores.s3 import make_client

    where = f"s3://{config.s3_bucket}/{config.s3_prefix}"
    try:
        client = make_client(config, timeout=5)
    except Exception as exc:  # botocore's own (a bad region name)
        return Check("s3", "fail", f"{where}: {type(exc).__name__}: {exc}")
    endpoint = client.meta.endpoint_url
    import boto3

    if boto3.Session(region_name=config.s3_region).get_credentials() is None:
        return Check(
            "s3",
            "fail",
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or give the host an IAM role",
        )
    host = urlsplit(endpoint).hostname or ""
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        return Check("s3", "fail", f"cannot resolve the endpoint's host {host!r} (DNS): {exc}")
    name = f"{config.s3_prefix}.qproxy-doctor/{config.node_id}-{os.urandom(4).hex()}"
    doing = "looking up the bucket"
    try:
        started = time.monotonic()
        client.head_bucket(Bucket=config.s3_bucket)
        doing = "writing a probe object"
        client.put_object(Bucket=config.s3_bucket, Key=name, Body=b"qproxy doctor probe\n")
        doing = "deleting the probe object"
        client.delete_object(Bucket=config.s3_bucket, Key=name)
        ms = (time.monotonic() - started) * 1000
    except Exception as exc:
        return Check("s3", "fail", _s3_problem(exc, where, endpoint, doing))
    return Check("s3", "ok", f"{where} at {endpoint}: verified put and delete in {ms:.0f} ms")


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
    """``nginx -t`` on the config ``qproxy nginx-config`` prints (in a scratch folder)."""
    from qproxy.ops.nginx import NginxOptions, find_nginx, full_config

    path = find_nginx()
    if path is None:
        return Check(
            "nginx", "warn", "not installed here (serve with `qproxy resolver --standalone`)"
        )
    with tempfile.TemporaryDirectory(prefix="qproxy-doctor-nginx-") as scratch:
        conf = Path(scratch) / "nginx.conf"
        try:
            conf.write_text(full_config(config, NginxOptions()))
        except QProxyError as exc:
            return Check("nginx", "fail", f"cannot make a config: {exc}")
        done = subprocess.run(
            [path, "-t", "-q", "-p", scratch, "-c", str(conf), "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=CHECK_SECONDS,
        )
    if done.returncode != 0:
        said = next(
            (line for line in done.stderr.splitlines() if "[emerg]" in line),
            done.stderr.strip()[-300:],
        )
        return Check("nginx", "fail", f"nginx -t refuses `qproxy nginx-config`'s config: {said}")
    return Check("nginx", "ok", f"{path}: nginx -t accepts `qproxy nginx-config`'s config")


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


def _loopback_on_a_cluster(
    name: str, variable: str, url: str, others: list[str], why: str
) -> Check | None:
    if others and _is_loopback_url(url):
        return Check(
            name,
            "fail",
            f"{variable} is {url}, a loopback URL, but other nodes are registered "
            f"({', '.join(others[:5])}): {why}",
        )
    return None


def check_node_url(config: Config) -> Check:
    """The other nodes and the workers fetch this node's files at QPROXY_NODE_URL: it must
    be reachable, and not loopback on a cluster."""
    url = config.node_url
    others = _other_nodes(config)
    loop = _loopback_on_a_cluster(
        "node url",
        "QPROXY_NODE_URL",
        url,
        others,
        "they and the workers cannot fetch this node's files there. Set it to this node's "
        "own address, e.g. http://10.0.0.21:8300",
    )
    if loop is not None:
        return loop
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
            f"{url} answered {answer.status_code}: is it this node's qproxy resolver (or its "
            "nginx, with the config `qproxy nginx-config` prints)?",
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
    loop = _loopback_on_a_cluster(
        "tus url",
        "QPROXY_NODE_TUS_URL",
        url,
        others,
        "tus requests they get for this node's uploads cannot reach it. Set it to where "
        "they reach this node's nginx",
    )
    if loop is not None:
        yield loop
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


CHECKS: tuple[tuple[str, Callable[[Config], Check | Iterator[Check]]], ...] = (
    ("secret", check_secret),
    ("local root", check_local),
    ("redis", check_redis),
    ("broker", check_broker),
    ("s3", check_s3),
    ("workers", check_workers),
    ("node url", check_node_url),
    ("tus url", check_tus_url),
    ("nginx", check_nginx),
)
# No check takes longer than this: a host that does not answer is a failed check.
CHECK_SECONDS = 15.0


def _timed(
    name: str, check: Callable[[Config], Check | Iterator[Check]], config: Config
) -> list[Check]:
    found: list[Check] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            result = check(config)
            found.extend([result] if isinstance(result, Check) else list(result))
        except BaseException as exc:
            failed.append(exc)

    # A daemon thread: one that hangs past the limit does not keep the command alive.
    thread = threading.Thread(target=run, name=f"doctor-{name}", daemon=True)
    thread.start()
    thread.join(CHECK_SECONDS)
    if thread.is_alive():
        return [Check(name, "fail", f"no answer within {CHECK_SECONDS:.0f} s")]
    if failed:
        exc = failed[0]
        reason = exc.reason if isinstance(exc, QProxyError) else f"{type(exc).__name__}: {exc}"
        return [Check(name, "fail", reason)]
    return found


def run_checks(config: Config, *, only: set[str] | None = None) -> list[Check]:
    """Every check (or those named in ``only``), each within CHECK_SECONDS, one's failure
    stopping none of the others."""
    out: list[Check] = []
    for name, check in CHECKS:
        if only is None or name in only:
            out.extend(_timed(name, check, config))
    return out
