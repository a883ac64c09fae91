"""The ``qproxy`` command. Every subcommand reads the same ``QPROXY_*`` environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from qproxy import __version__
from qproxy.config import Config
from qproxy.errors import QProxyError

EPILOG = """\
configuration comes from QPROXY_* environment variables (and QPROXY_CONFIG, a TOML file):
QPROXY_LOCAL_ROOT, QPROXY_REDIS_URL, QPROXY_BROKER_URL, QPROXY_S3_BUCKET,
QPROXY_S3_ENDPOINT_URL, QPROXY_S3_REGION, QPROXY_S3_PREFIX, QPROXY_PUBLIC_PATH,
QPROXY_REDIRECT, QPROXY_REMOTE_BASE_URL, QPROXY_SECRET, QPROXY_NODE_ID, QPROXY_NODE_URL,
QPROXY_KEEP_LOCAL_SECONDS, QPROXY_MAX_UPLOAD_BYTES. See README.md for the full table.
"""


def _config() -> Config:
    from qproxy import logs

    config = Config.from_env()
    logs.setup(config)  # every command logs with time and level, text or JSON
    return config


def _default_server() -> str:
    try:
        import granian  # noqa: F401
    except ImportError:
        return "uvicorn"
    return "granian"


def listen_address(config: Config) -> str:
    """Where the resolver listens by default: where nginx and, on a cluster, the other
    nodes (at QPROXY_NODE_URL) can reach it."""
    from urllib.parse import urlsplit

    host = urlsplit(config.node_url).hostname or "127.0.0.1"
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return "127.0.0.1"
    return "::" if ":" in host else "0.0.0.0"


def cmd_resolver(args: argparse.Namespace, extra: list[str]) -> int:
    if args.standalone:
        os.environ["QPROXY_STANDALONE"] = "1"
    from qproxy.serve.resolver import check_config

    config = _config()
    check_config(config)  # fail here, loudly, rather than in every worker
    if args.host is None:
        args.host = listen_address(config)
    if args.server == "granian":
        from granian.constants import Interfaces
        from granian.log import LogLevels
        from granian.server import Server

        Server(
            "qproxy.resolver:create_app",
            factory=True,
            address=args.host,
            port=args.port,
            interface=Interfaces.ASGI,
            workers=args.workers,
            websockets=False,
            log_level=LogLevels(args.log_level),
            log_access=args.access_log,
        ).serve()
        return 0
    import uvicorn

    uvicorn.run(
        "qproxy.resolver:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
        proxy_headers=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.worker.app import run_worker

    pool = ["--pool", args.pool] if args.pool else []
    run_worker(_config(), [*pool, *extra], metrics_port=args.metrics_port)
    return 0


def _fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"


def cmd_status(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores

    config = _config()
    key = key_of(config, args.key)
    record = Stores(config).state.get(key)
    if record is None:
        if args.json:
            print(json.dumps({"key": key, "state": None, "error": "not found"}))
        else:
            print(f"qproxy: no record for {key}", file=sys.stderr)
        return 1
    data = record.as_dict()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for name in (
        "key",
        "state",
        "size",
        "sha256",
        "filename",
        "content_type",
        "node",
        "attempts",
        "error",
    ):
        if data[name] not in ("", None):
            print(f"{name:13} {data[name]}")
    for name in ("created", "updated", "remote_at"):
        if data[name]:
            print(f"{name:13} {_fmt_time(data[name])}")
    print(f"{'local copy':13} {'yes' if record.has_local else 'no'}")
    return 0


def key_of(config: Config, given: str) -> str:
    """A key, given as itself or as a file's URL (``/media/KEY``, ``https://host/media/KEY``,
    signed or not): the key, validated."""
    from urllib.parse import unquote, urlsplit

    from qproxy.keys import validate_key

    text = given
    if "://" in text:
        text = urlsplit(text).path
    elif "?" in text:
        text = text.partition("?")[0]
    if text.startswith(config.public_path):
        text = unquote(text[len(config.public_path) :])
    return validate_key(text)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_ls(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.core.record import STATES

    node = Stores(_config())
    states = [args.state] if args.state else [s for s in STATES if s != "deleted"]
    records = []
    for state in states:
        # Remote files are not indexed: all of them are read (up to 100,000), then sorted.
        limit = 100_000 if state == "remote" else args.limit
        for key in node.state.keys_in_state(state, limit=limit, newest=True):
            record = node.state.get(key)
            if record is not None and (not args.node or record.node == args.node):
                records.append(record)
    records.sort(key=lambda r: r.created, reverse=True)  # newest first
    records = records[: args.limit]
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2, sort_keys=True))
        return 0
    now = time.time()
    rows = [
        (r.state, _size(r.size), _age(now - r.created), r.node, r.filename or "-", r.key)
        for r in records
    ]
    header = ("STATE", "SIZE", "AGE", "NODE", "FILENAME", "KEY")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        cells = [
            str(c).ljust(w) if i != 1 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        print("  ".join([*cells, row[5]]))
    if not rows:
        print("(no files)", file=sys.stderr)
    return 0


def cmd_put(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores

    if args.replace and not args.key:
        print("qproxy put: --replace needs --key (the file to replace)", file=sys.stderr)
        return 2
    if args.key and len(args.files) > 1:
        print("qproxy put: --key names one file; give one FILE with it", file=sys.stderr)
        return 2
    for path in args.files:  # every one checked before any is stored
        if os.path.isdir(path):
            print(f"qproxy put: {path} is a folder: give the files in it", file=sys.stderr)
            return 2
        if not os.path.isfile(path):
            print(f"qproxy put: {path}: no such file", file=sys.stderr)
            return 2
        if not os.access(path, os.R_OK):
            print(f"qproxy put: {path}: not readable", file=sys.stderr)
            return 2
    stores = Stores(_config())
    for path in args.files:
        print(_put_one(stores, path, args), flush=True)
    return 0


def _put_one(stores: Any, path: str, args: argparse.Namespace) -> str:
    from tqdm import tqdm

    from qproxy.core.multipart import clean_content_type, clean_filename
    from qproxy.keys import alternative_key, generate_key, validate_key
    from qproxy.lifecycle.files import reserve_free, store

    filename = clean_filename(os.path.basename(path))
    size = os.path.getsize(path)
    with (
        open(path, "rb") as fh,
        # On a terminal: size, rate and time left (tqdm); elsewhere nothing.
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=filename[:40],
            disable=not sys.stderr.isatty(),
            leave=True,  # a line per file, with its size and rate, once done
        ) as bar,
    ):
        reserved: int | None = None
        if not args.key:
            key = generate_key(filename)  # 144 random bits: never taken
        elif args.replace:
            key = validate_key(args.key)  # a new version of that file, served from now on
        else:
            # The name is claimed before a byte is written: of two writers of one name
            # (processes, nodes) exactly one gets it, the other a name like it.
            wanted = validate_key(args.key)
            key, reserved = reserve_free(stores, wanted, alternative_key)
            if key != wanted:
                print(f"qproxy put: {wanted} exists; stored as {key}", file=sys.stderr)

        def chunks() -> Iterator[bytes]:
            while chunk := fh.read(1024 * 1024):
                bar.update(len(chunk))
                yield chunk

        fields = {"filename": filename, "content_type": clean_content_type(None, filename)}
        store(stores, chunks(), key, fields, replace=args.replace, reserved=reserved)
    return str(key)


def cmd_sign(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.headers import sign_url

    print(sign_url(args.key, args.expires, method=args.method, config=_config()))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.worker.sweep import sweep

    report = sweep(
        Stores(_config()),
        stuck_after=args.stuck_after,
        pending_max_age=args.pending_max_age,
        cluster=not args.node_only,
    )
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for name, value in report.as_dict().items():
            print(f"{name.replace('_', ' '):18} {value}")
    return 0


def cmd_nodes(args: argparse.Namespace, extra: list[str]) -> int:
    import time

    from qproxy.compose import Stores
    from qproxy.lifecycle import nodes

    stores = Stores(_config())
    now = time.time()
    found = nodes.listing(stores)
    if args.json:
        rows = [
            {**vars(n), "age": round(n.age(now), 1), "gone": nodes.is_gone(stores, n, now)}
            for n in found
        ]
        print(json.dumps(rows, sort_keys=True))
        return 0
    if not found:
        print("no node has registered (a node registers when its resolver runs)")
        return 0
    print(f"{'NODE':20} {'URL':32} {'LAST SEEN':>10}  STATE")
    for n in found:
        status = "gone" if nodes.is_gone(stores, n, now) else "up"
        if n.draining:
            status += ", draining"
        print(f"{n.id:20} {n.url:32} {n.age(now):>9.0f}s  {status}")
    return 0


def cmd_drain(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.lifecycle import nodes

    stores = Stores(_config())
    node = stores.config.node_id
    if args.cancel:
        nodes.cancel_drain(stores)
        print(f"{node}: takes uploads again")
        return 0
    last = [-1]

    def progress(left: int) -> None:
        if left != last[0]:
            print(f"{node}: {left} file(s) not yet in S3", flush=True)
            last[0] = left

    if not nodes.drain(stores, timeout=args.timeout, progress=progress):
        print(
            f"qproxy drain: files of {node} still not in S3 after {args.timeout:.0f}s; the node "
            "stays draining (run again to wait more; see qproxy ls --state failed)",
            file=sys.stderr,
        )
        return 1
    print(f"{node}: drained and deregistered; it can be stopped (qproxy drain --cancel undoes)")
    return 0


def cmd_retry(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.worker.sweep import retry_failed

    if not args.all_failed and not args.keys:
        print("qproxy retry: give KEY... or --all-failed", file=sys.stderr)
        return 2
    done = retry_failed(Stores(_config()), None if args.all_failed else args.keys)
    for key in done:
        print(f"queued {key}")
    if args.keys and len(done) < len(args.keys):
        missing = sorted(set(args.keys) - set(done))
        print(f"qproxy retry: not failed (nothing to do): {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_delete(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.lifecycle.files import delete

    config = _config()
    key = key_of(config, args.key)
    if not delete(Stores(config), key):
        print(f"qproxy: nothing to delete for {key}", file=sys.stderr)
        return 1
    print(f"deleted {key} (copies are removed in the background)")
    return 0


def cmd_reconcile(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.compose import Stores
    from qproxy.worker.reconcile import reconcile

    report = reconcile(Stores(_config()))
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        print(f"restored from S3       {report.from_s3}")
        print(f"restored from journal  {report.from_journal}")
        print(f"restored from disk     {report.from_disk}")
        print(f"already known          {report.already_known}")
    return 0


def cmd_doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.ops.doctor import Check, run_checks

    try:
        config = _config()
    except QProxyError as exc:
        checks = [Check("config", "fail", str(exc))]
    else:
        only = {name.replace("-", " ") for name in args.check or ()}
        found = run_checks(config, only=only or None)
        checks = [Check("config", "ok", f"node {config.node_id}"), *found]
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for check in checks:
            print(f"{check.level.upper():5} {check.name:18} {check.detail}")
    if checks[0].level == "fail":
        return 2  # the settings themselves: as every other command says them
    return 1 if any(c.level == "fail" for c in checks) else 0


def _registered_peers(config: Config) -> tuple[str, ...]:
    """The URLs of the other web nodes registered in Redis and not gone (``qproxy nodes``;
    draining ones too: they still hold files)."""
    from qproxy.compose import Stores
    from qproxy.lifecycle import nodes

    stores = Stores(config)
    now = time.time()
    return tuple(
        n.url
        for n in nodes.listing(stores)
        if n.id != config.node_id and n.url and not nodes.is_gone(stores, n, now)
    )


def cmd_nginx_config(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.ops.nginx import NginxOptions, full_config, server_block

    config = _config()
    options = NginxOptions(
        listen=args.listen,
        app=args.app,
        resolver=args.resolver,
        mode=args.mode,
        micro_cache=args.micro_cache,
        micro_cache_path=args.micro_cache_path or NginxOptions.micro_cache_path,
        offload=args.offload,
        peer_cache=args.peer_cache,
        peers=tuple(args.peer) + (_registered_peers(config) if args.registered_peers else ()),
    )
    text = full_config(config, options) if args.full else server_block(config, options)
    if args.offload:
        # nginx creates its body folder (.qp/offload) but not the folders above it: a
        # fresh root would fail `nginx -t`.
        from qproxy.stores.local import LocalStore

        try:
            LocalStore(config.local_path, node_id=config.node_id).ensure()
        except OSError as exc:
            print(
                f"qproxy: note: create {config.local_path / '.qp'} before starting nginx "
                f"({exc.strerror})",
                file=sys.stderr,
            )
    print(text, end="")
    return 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from qproxy.dev.demo import run_demo

    use_nginx = False if args.no_nginx else None
    return run_demo(once=args.once, use_nginx=use_nginx, mode=args.mode, app=args.app)


AddCommand = Callable[..., argparse.ArgumentParser]


def _parse_resolver(add: AddCommand) -> None:
    p = add("resolver", "run the resolver (the Starlette app nginx asks where each file is)")
    p.add_argument(
        "--host",
        help="address to listen on (default: 127.0.0.1 when QPROXY_NODE_URL is a loopback "
        "URL, a single node; else 0.0.0.0, so that other nodes reach it there: from other "
        "hosts it serves only signed /internal/blob URLs)",
    )
    p.add_argument("--port", type=int, default=8300, help="port to listen on (default: 8300)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument(
        "--server",
        choices=["granian", "uvicorn"],
        default=_default_server(),
        help="the ASGI server (default: granian when installed: measured ~1.2x uvicorn's "
        "requests per second here, see make bench)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="without nginx: send local files itself under QPROXY_PUBLIC_PATH",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's log level (default: info)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_resolver)


def _parse_worker(add: AddCommand) -> None:
    p = add(
        "worker",
        "run a Celery worker that moves files to S3",
        "Run a Celery worker on qproxy's queue. Arguments qproxy does not know are passed to "
        "Celery's worker, e.g. `qproxy worker --concurrency 8`.",
    )
    p.add_argument(
        "--pool",
        metavar="POOL",
        help="Celery's pool: threads (default: transfers wait on disks and networks, and a "
        "thread costs less CPU per file than a process), prefork, solo, gevent, eventlet",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve this host's worker metrics (Prometheus) on PORT, e.g. 9640 (default: off)",
    )
    p.set_defaults(func=cmd_worker, passthrough=True)


def _parse_status(add: AddCommand) -> None:
    p = add("status", "show one file's record (its state among the fields)")
    p.add_argument("key", help="the file's key, or its URL (/media/KEY, https://host/media/KEY)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_status)


def _parse_ls(add: AddCommand) -> None:
    p = add(
        "ls",
        "list files, newest first",
        "List files with their state, size, age, node and filename, newest first (every "
        "state but deleted unless --state says which).",
    )
    p.add_argument(
        "--state",
        choices=["pending", "local", "queued", "transferring", "remote", "failed", "deleted"],
        help="only files in this state",
    )
    p.add_argument("--node", help="only files uploaded through this node (its QPROXY_NODE_ID)")
    p.add_argument(
        "--limit", type=int, default=1000, help="at most this many files (default: 1000)"
    )
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=cmd_ls)


def _parse_put(add: AddCommand) -> None:
    p = add("put", "store local files as uploads would (prints each one's key)")
    p.add_argument("files", nargs="+", metavar="FILE", help="paths of the files to store")
    p.add_argument(
        "--key",
        help="store under this key instead of a generated one; if it is taken, under a key "
        "like it (printed), unless --replace",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --key: replace the file stored under it (a new version)",
    )
    p.set_defaults(func=cmd_put)


def _parse_sign(add: AddCommand) -> None:
    p = add(
        "sign",
        "print a signed, expiring URL for a file (the only way a private file is served)",
        "Print the path and query of a URL that serves KEY until it expires (private files: "
        "QPROXY_PRIVATE_PREFIXES, or uploads the app marked private). The signature binds the "
        "key, the expiry and the method; it needs QPROXY_SECRET.",
    )
    p.add_argument("key", help="the file's key")
    p.add_argument("--expires", type=int, default=300, help="seconds the URL works (default: 300)")
    p.add_argument("--method", choices=["GET", "HEAD"], default="GET", help="default: GET")
    p.set_defaults(func=cmd_sign)


def _parse_sweep(add: AddCommand) -> None:
    p = add(
        "sweep",
        "finish what crashes left half done",
        "Replay this node's journal into Redis, drop local copies that are safely in S3, "
        "remove temp files of requests that died; then (unless --node-only) queue again "
        "transfers stuck in local/queued or past their lease, and abort stale S3 multipart "
        "uploads. The resolver runs this on its own every few seconds.",
    )
    p.add_argument(
        "--stuck-after", type=float, help="seconds without progress (default: QPROXY_STUCK_SECONDS)"
    )
    p.add_argument(
        "--pending-max-age", type=float, help="seconds (default: QPROXY_PENDING_MAX_AGE)"
    )
    p.add_argument("--node-only", action="store_true", help="only this node's part")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_sweep)


def _parse_nodes(add: AddCommand) -> None:
    p = add(
        "nodes",
        "list the web nodes (id, URL, when last seen, draining)",
        "List the web nodes registered in Redis: each node's resolver registers it every "
        "janitor round. A node not seen for three rounds is shown as gone.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_nodes)


def _parse_drain(add: AddCommand) -> None:
    p = add(
        "drain",
        "empty this node before it leaves: no new uploads, everything to S3, deregister",
        "Run on a web node that is leaving: it refuses new uploads from now on (503 with "
        "Retry-After, so a load balancer or client goes elsewhere), queues the transfer of "
        "every file of this node not yet in S3 (held and failed ones too), waits until none "
        "is left, then deregisters the node. Exit status 1 if files remain after --timeout.",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default: 3600)")
    p.add_argument("--cancel", action="store_true", help="take uploads again and register")
    p.set_defaults(func=cmd_drain)


def _parse_retry(add: AddCommand) -> None:
    p = add("retry", "queue failed transfers again")
    p.add_argument("keys", nargs="*", metavar="KEY", help="the failed files to queue again")
    p.add_argument("--all-failed", action="store_true", help="every record in state failed")
    p.set_defaults(func=cmd_retry)


def _parse_delete(add: AddCommand) -> None:
    p = add("delete", "delete a file: 404 at once, every copy removed in the background")
    p.add_argument("key", help="the file's key, or its URL (/media/KEY, https://host/media/KEY)")
    p.set_defaults(func=cmd_delete)


def _parse_reconcile(add: AddCommand) -> None:
    p = add(
        "reconcile",
        "rebuild records after Redis lost them",
        "Rebuild every record from an S3 listing, this node's journal and its disk (run it "
        "on each web node), e.g. after FLUSHALL or on a new empty Redis.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_reconcile)


# (the doctor's checks, as --check names them: no import of qproxy.ops.doctor at start-up)
CHECK_NAMES = [
    "secret", "local-root", "redis", "broker", "s3", "workers", "node-url", "tus-url", "nginx",
]  # fmt: skip


def _parse_doctor(add: AddCommand) -> None:
    p = add(
        "doctor",
        "check this node's setup (config, disk, Redis, S3, workers, nginx)",
        "Check what this node needs, the way it will be used: writes and removes a probe file "
        "in the local root and a probe object in S3, asks Redis for its durability settings "
        "and Celery for its workers. Exit status 1 if anything failed, 2 if the settings "
        "themselves are wrong.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--check",
        action="append",
        metavar="NAME",
        choices=CHECK_NAMES,
        help=f"run only this check (repeatable): {', '.join(CHECK_NAMES)}",
    )
    p.set_defaults(func=cmd_doctor)


def _parse_nginx_config(add: AddCommand) -> None:
    p = add(
        "nginx-config",
        "print nginx configuration for this node",
        "Print the upstream and server blocks for this node (include them in nginx's http "
        "block), or with --full a complete nginx.conf that runs as `nginx -p DIR -c FILE`.",
    )
    p.add_argument("--full", action="store_true", help="a complete, standalone nginx.conf")
    p.add_argument(
        "--mode",
        choices=["x-accel", "auth_request"],
        default="x-accel",
        help="how nginx asks the resolver (default: x-accel)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        help="HOST:PORT nginx listens on (default: 127.0.0.1:8080)",
    )
    p.add_argument(
        "--app",
        default="http://127.0.0.1:8000",
        help="URL of the app (default: http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--resolver",
        default="http://127.0.0.1:8300",
        help="URL of the resolver (default: http://127.0.0.1:8300)",
    )
    p.add_argument(
        "--micro-cache",
        action="store_true",
        help="let nginx reuse the resolver's answers briefly (1 s for a local file, never a "
        "404): hot files cost no Redis lookup. A deleted file may be served for up to 1 s more.",
    )
    # X-Accel mode's micro-cache had a second, caching server listening here; it asks
    # with a cached subrequest now. Still taken, so that old command lines work.
    p.add_argument("--micro-cache-listen", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--micro-cache-path",
        default="",
        help="folder for the cached answers (default: /var/lib/nginx/qproxy-cache; with --full, "
        "qproxy_decisions under nginx's prefix)",
    )
    p.add_argument(
        "--peer-cache",
        metavar="DIR",
        default="",
        help="keep files read from other web nodes in DIR for 60 s after their last read "
        "(by SHA-256; files under 10 MB; at most half of DIR): read again here, one is served "
        "as a local file, only when the resolver says so, as every file. DIR must be a "
        "filesystem of its own (e.g. a tmpfs): nginx cuts a download short when the disk "
        "under its cache is full",
    )
    p.add_argument(
        "--peer",
        metavar="NODE_URL",
        action="append",
        default=[],
        help="another web node's QPROXY_NODE_URL (repeat for each; `qproxy nodes` lists "
        "them): nginx keeps connections to it open instead of opening one for every file "
        "read from it. A node not named is still reached, on a new connection each time",
    )
    p.add_argument(
        "--registered-peers",
        action="store_true",
        help="--peer for every other web node registered in Redis and not gone, as `qproxy "
        "nodes` lists them (print the config again, and reload nginx, when a node joins)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="on QPROXY_RAW_UPLOAD_PATHS let nginx write the body to disk itself and hand "
        "qproxy the file (hashed and renamed into the store, not copied); the app must run "
        "as nginx's worker user or root",
    )
    p.set_defaults(func=cmd_nginx_config)


def _parse_demo(add: AddCommand) -> None:
    p = add("demo", "start the whole stack locally and show a file going local -> remote")
    p.add_argument("--once", action="store_true", help="do one round trip and exit (0 on success)")
    p.add_argument("--no-nginx", action="store_true", help="use the resolver's standalone mode")
    p.add_argument(
        "--mode",
        choices=["x-accel", "auth_request"],
        default="x-accel",
        help="nginx's mode (default: x-accel)",
    )
    p.add_argument(
        "--app",
        default="qproxy.dev.demo:make_app",
        help="MODULE:ATTR of the app to run instead of the demo app (WSGI or ASGI; it must "
        "answer POST /upload with JSON {'keys': [...]}), e.g. examples.flask_app:app",
    )
    p.set_defaults(func=cmd_demo)


COMMANDS: tuple[Callable[[AddCommand], None], ...] = (
    _parse_resolver,
    _parse_worker,
    _parse_status,
    _parse_ls,
    _parse_put,
    _parse_sign,
    _parse_sweep,
    _parse_nodes,
    _parse_drain,
    _parse_retry,
    _parse_delete,
    _parse_reconcile,
    _parse_doctor,
    _parse_nginx_config,
    _parse_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qproxy",
        description="Accept big uploads at local-disk speed, move them to S3 in the background, "
        "serve them from wherever they are.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description or help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for command in COMMANDS:
        command(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra))
    except QProxyError as exc:
        print(f"qproxy: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
