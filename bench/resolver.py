"""Resolver rows: resolve + serve against nginx serving the file statically (cold, hot with
the micro-cache, both nginx modes), and presigned/public redirects against a bare 302."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import (
    NGINX_STATIC,
    Bench,
    Row,
    fmt,
)
from qproxy.compose import Stores


def resolve_rows(b: Bench) -> None:
    seconds = 1 if b.quick else 8
    stack = b.stack
    node_root = Path(stack.env["QPROXY_LOCAL_ROOT"])
    data = os.urandom(64 * 1024)
    r = httpx.post(stack.front + "/upload", files={"file": ("bench.bin", data)})
    r.raise_for_status()
    key = r.json()["keys"][0]
    stack.services["worker"].signal(signal.SIGSTOP)  # keep it local for this row
    try:
        xaccel = stack.front
        auth = b.qproxy_nginx("nginx-auth", mode="auth_request")
        bare = b.uvicorn("bare-resolver", "bench.apps:bare_resolver")
        bare_ngx = b.qproxy_nginx("nginx-bare", resolver=bare)
        static = b.nginx("nginx-static", NGINX_STATIC.replace("{root}", str(node_root) + "/"))
        micro = {
            mode: b.qproxy_nginx(f"nginx-micro-{mode}", mode=mode, micro_cache=True)
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
            ("xaccel", "X-Accel mode", 0.4, "cold"),
            ("auth", "auth_request mode", 0.4, "cold"),
            ("xaccel-micro", "X-Accel mode, hot key, micro-cache", 0.85, "hot"),
            ("auth-micro", "auth_request mode, hot key, micro-cache", 0.85, "hot"),
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
    # Every request asking Redis: the record cache off (QPROXY_RECORD_CACHE).
    uncached = b.serve(
        "resolver-uncached",
        [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1", "--port", "{port}"],
        "/metrics",
        env={"QPROXY_RECORD_CACHE": "0"},
    )
    bare = b.uvicorn("bare-302", "bench.apps:bare_resolver")
    runs: dict[str, list[float]] = {"presigned": [], "public": [], "uncached": [], "bare": []}
    for _ in range(b.rounds):
        runs["presigned"].append(b.wrk(f"{stack.url('resolver')}/resolve/{rkey}", seconds)["rps"])
        runs["public"].append(b.wrk(f"{public}/resolve/{rkey}", seconds)["rps"])
        runs["uncached"].append(b.wrk(f"{uncached}/resolve/{rkey}", seconds)["rps"])
        runs["bare"].append(b.wrk(f"{bare}/redirect/{rkey}", seconds)["rps"])
    for mode, target in (
        ("presigned", 0.8),
        ("public", None),
        ("uncached", None),
    ):
        label = "presigned, every request asking Redis" if mode == "uncached" else mode
        row = Row(
            f"resolve remote (302/s), {label}",
            "req/s",
            f"resolver, {label}",
            "bare Starlette 302",
            cand=runs[mode],
            base=runs["bare"],
            target=f">= {target}x bare" if target else "",
            target_ratio=target,
        )
        b.rows.append(row)
        print(f"  {row.name}: {fmt(row)}", flush=True)
    b.stop("resolver-public")
    b.stop("resolver-uncached")
    b.stop("bare-302")


def peer_serve_row(b: Bench) -> None:
    """A file held by another web node, served through this node's nginx (the resolver says
    "peer": nginx streams it from the other node's resolver, signed), against a file on
    this node's own disk through the same nginx."""
    from qproxy.dev.devstack import free_port
    from qproxy.lifecycle.files import commit, delete
    from qproxy.ops.nginx import NginxOptions, full_config

    seconds = 1 if b.quick else 6
    stack = b.stack
    port = free_port()
    resolver_url = f"http://127.0.0.1:{port}"
    root = b.tmp / "node-2"
    env = {"QPROXY_NODE_ID": "node-2", "QPROXY_LOCAL_ROOT": str(root)}
    argv = [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1", "--port", str(port)]
    stack.spawn("resolver-node-2", argv, env=env)
    stack.wait_for(
        "resolver-node-2", lambda: httpx.get(resolver_url + "/healthz").status_code == 200
    )
    config = stack.config.replace(node_id="node-2", local_root=str(root))
    options = NginxOptions(listen="127.0.0.1:{port}", app=stack.url("app"), resolver=resolver_url)
    # The other node's nginx, where its QPROXY_NODE_URL points (it sends the bytes itself).
    nginx_url = b.nginx("nginx-node-2", full_config(config, options))
    here = Stores(stack.config)
    there = Stores(config.replace(node_url=nginx_url))
    there_bare = Stores(config.replace(node_url=resolver_url))
    data = os.urandom(64 * 1024)
    keys = {}
    for name, node in (("peer", there), ("peer-resolver", there_bare), ("local", here)):
        node.local.ensure()
        temp = node.local.create_temp()
        temp.write(data)
        temp.close()
        keys[name] = f"bench/{name}-{os.urandom(4).hex()}.bin"
        # Held (delayed): no worker moves it to S3 while the row runs.
        commit(node, temp, keys[name], {"filename": "p.bin"}, enqueue=False)
    for name, key in keys.items():
        r = httpx.get(f"{stack.front}/media/{key}")
        assert r.content == data, (name, r.status_code, r.headers)
        assert r.headers.get("x-qproxy-source") == name.partition("-")[0], (name, r.headers)

    def against_local(
        what: str, candidate: str, front: str, peer: str = "peer", target: float | None = 0.5
    ) -> None:
        """The peer's file against this node's own, through the same nginx."""
        b.alternate(
            Row(
                what,
                "req/s",
                candidate,
                "local (nginx -> resolver -> this disk)",
                target=f">= {target}x local" if target else "",
                target_ratio=target,
            ),
            lambda: b.wrk(f"{front}/media/{keys[peer]}", seconds)["rps"],
            lambda: b.wrk(f"{front}/media/{keys['local']}", seconds)["rps"],
        )

    # As the README sets nodes up: this node's nginx names the others (--peer), and keeps
    # its connections to them open.
    named = b.qproxy_nginx("nginx-peers", peers=(nginx_url, resolver_url))
    against_local(
        "serve 64 KiB held by another web node",
        "peer (nginx -> resolver -> the peer's nginx, its resolver checks, its nginx sends)",
        named,
    )
    against_local(
        "serve 64 KiB held by another web node, QPROXY_NODE_URL at its resolver",
        "peer (nginx -> resolver -> the peer's resolver sends)",
        named,
        peer="peer-resolver",
        target=None,
    )
    against_local(
        "serve 64 KiB held by another web node, not named by --peer",
        "peer, a new connection to it for each read",
        stack.front,
        target=None,
    )
    b.stop("nginx-peers")
    # --peer-cache wants a filesystem of its own.
    folder = b.tmp / "peer-cache"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=755", "tmpfs", str(folder)],
                   check=True)  # fmt: skip
    cached = b.qproxy_nginx(
        "nginx-peer-cache", peer_cache=str(folder), peers=(nginx_url, resolver_url)
    )
    for _ in range(2):
        r = httpx.get(f"{cached}/media/{keys['peer']}")
        assert r.content == data and r.headers.get("x-qproxy-source") == "peer", r.headers
    assert r.headers.get("x-qproxy-cache") == "HIT", r.headers
    against_local(
        "serve 64 KiB held by another web node, read again (--peer-cache)",
        "peer, nginx --peer-cache (nginx -> resolver -> this node's copy)",
        cached,
    )
    b.stop("nginx-peer-cache")
    subprocess.run(["umount", "-l", str(folder)], check=False)
    b.stop("resolver-node-2")
    b.stop("nginx-node-2")
    for name, node in (("peer", there), ("peer-resolver", there_bare), ("local", here)):
        delete(node, keys[name])
        node.local.remove(keys[name])
