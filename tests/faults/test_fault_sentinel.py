"""Redis that fails over: a master, a replica and three sentinels (``redis-server
--sentinel``); the master SIGKILLed during 200 uploads with transfers running.

Every process (the middleware, the resolver's reader, the worker's broker and state) finds
the master through the sentinels (``redis+sentinel://``), and again after the failover.
Afterwards the oracle holds: every accepted upload is remote with its bytes, nothing else
is in S3. What the promoted replica had not received, the nodes' journals replay (a new
Redis history is noticed, and the journal's last minutes are replayed again).

The window during which uploads failed or waited is measured and written to
``.cache/reports/sentinel-failover.json`` (and printed).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from qproxy.dev.devstack import Service, find_redis, free_port
from qproxy.stores.state import StateStore
from tests.conftest import ROOT
from tests.faults.helpers import Accepted, Prober, fault_stack, oracle, sizes, upload_one

MASTER = "qpmaster"


def spawn(name: str, argv: list[str], folder: Path) -> Service:
    log_path = folder / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True
        )
    return Service(name, argv, process, log_path)


class Link:
    """The replication link, through a relay the test controls: ``hold()`` stops what the
    master sends from reaching the replica (lag), ``cut()`` drops it unsent (the master's
    host is gone with its socket buffers) and refuses the replica from then on."""

    def __init__(self, master_port: int) -> None:
        self.master_port = master_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.dead = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                replica, _ = self.listener.accept()
            except OSError:
                return
            if self.dead:
                replica.close()
                continue
            try:
                master = socket.create_connection(("127.0.0.1", self.master_port))
            except OSError:
                # The master is not listening yet (it starts beside the replica): refused,
                # as the master itself would; the replica tries again a second later.
                replica.close()
                continue
            self.sockets += [replica, master]
            threading.Thread(target=self._pump, args=(master, replica, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(replica, master, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, held: bool) -> None:
        try:
            while True:
                if held:
                    self.flowing.wait()
                data = source.recv(65536)
                if not data or self.dead:
                    return
                target.sendall(data)
        except OSError:
            return

    def hold(self) -> None:
        self.flowing.clear()

    def cut(self) -> None:
        self.dead = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                # RST, not FIN: what was buffered is thrown away, not delivered.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        self.flowing.set()


def wait(what: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if what():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def test_redis_master_killed_during_uploads_fails_over_and_loses_nothing(
    tmp_path: Path,
) -> None:
    server = find_redis()
    assert server is not None
    master_port, replica_port = free_port(), free_port()
    sentinel_ports = [free_port() for _ in range(3)]
    services: list[Service] = []
    link = Link(master_port)
    for name, port, extra in (
        ("master", master_port, []),
        ("replica", replica_port, ["--replicaof", "127.0.0.1", str(link.port)]),
    ):
        folder = tmp_path / name
        folder.mkdir()
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        argv += ["--maxmemory-policy", "noeviction", *extra]
        services.append(spawn(name, argv, folder))
    for i, port in enumerate(sentinel_ports):
        folder = tmp_path / f"sentinel{i}"
        folder.mkdir()
        conf = folder / "sentinel.conf"  # the sentinel rewrites it: one each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        services.append(spawn(f"sentinel{i}", [server, str(conf), "--sentinel"], folder))
    try:
        replica = redis.Redis(port=replica_port)
        wait(lambda: replica.info("replication").get("master_link_status") == "up")
        for port in sentinel_ports:
            sentinel = redis.Redis(port=port)
            wait(lambda s=sentinel: s.sentinel_master(MASTER)["num-slaves"] >= 1)
            wait(lambda s=sentinel: s.sentinel_master(MASTER)["num-other-sentinels"] >= 2)
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinel_ports)
        url = f"redis+sentinel://{hosts}/{MASTER}/0"
        with fault_stack(QPROXY_REDIS_URL=url) as stack:
            run_the_failover(stack, services[0], link, replica_port)
    finally:
        for service in reversed(services):
            service.stop()


def run_the_failover(stack: object, master: Service, link: Link, replica_port: int) -> None:
    accepted = Accepted()
    timeline: list[tuple[float, float, bool]] = []  # start, duration, accepted
    lock = threading.Lock()
    killed_at: list[float] = []

    def killer() -> None:
        while len(timeline) < 30:  # uploads in, transfers running
            time.sleep(0.05)
        # The replica falls behind first (stopped: what replication lag is), so the master
        # dies with writes the replica never got: commits, transfers marked remote. The
        # failover loses them, as a real one can. 7 s: longer than the journal's settle
        # time, so the node has already replayed (and skipped) those commits before the
        # failover: only the replay of a new history brings them back.
        link.hold()
        time.sleep(6.0)
        killed_at.append(time.monotonic())
        master.signal(signal.SIGKILL)
        link.cut()

    def run(chunk: list[int]) -> None:
        with httpx.Client(timeout=60) as client:
            for size in chunk:
                start = time.monotonic()
                key = upload_one(stack, size, accepted, client)  # type: ignore[arg-type]
                with lock:
                    timeline.append((start, time.monotonic() - start, key is not None))
                time.sleep(0.2)  # uploads span the lag, the kill and after

    # Redis as every process sees it: a write and a read through the sentinels every 50 ms.
    outages: list[float] = []
    probing = threading.Event()

    def probe() -> None:
        client = StateStore.from_url(stack.config.redis_url).redis  # type: ignore[attr-defined]
        while not probing.is_set():
            try:
                client.set("qp-probe", "1")
                client.get("qp-probe")
            except redis.RedisError:
                outages.append(time.monotonic())
            time.sleep(0.05)

    prober_thread = threading.Thread(target=probe, daemon=True)
    prober_thread.start()
    all_sizes = sizes(200, high=1024 * 1024, seed=11)
    chunks = [all_sizes[i::4] for i in range(4)]
    thread = threading.Thread(target=killer)
    with Prober(stack, accepted) as prober:  # type: ignore[arg-type]
        thread.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(run, chunks))
        thread.join()
        # The replica took over (the sentinels say so), and every process followed.
        promoted = redis.Redis(port=replica_port)
        wait(lambda: promoted.info("replication")["role"] == "master", timeout=60)
        assert len(accepted.files) == 200, (accepted.refused, accepted.errors)
        oracle(stack, accepted, timeout=120, prober=prober)  # type: ignore[arg-type]
    probing.set()
    prober_thread.join(10)
    assert outages, "Redis never failed: the master was not the one in use"
    t0 = killed_at[0]
    after = [(s - t0, d, ok) for s, d, ok in timeline if s + d >= t0]
    failed = [s for s, _, ok in after if not ok]
    slow = [(s, d) for s, d, ok in after if d > 1.0]
    baseline = sorted(d for s, d, _ in timeline if s + d < t0)
    report = {
        "uploads": len(timeline),
        "failed_after_kill": len(failed),
        "slow_after_kill (> 1 s)": len(slow),
        "longest_upload_after_kill_s": round(max((d for _, d, _ in after), default=0.0), 3),
        "median_upload_before_kill_s": round(baseline[len(baseline) // 2], 3) if baseline else 0,
        "window_s (kill to the end of the last slow or failed upload)": round(
            max([s + d for s, d in slow] + failed + [0.0]), 3
        ),
        "redis_unavailable_s (kill to the last failed write or read)": round(
            max(outages) - killed_at[0], 3
        ),
        "served_during_failover (HEAD statuses)": dict(prober.statuses),
    }
    out = ROOT / ".cache" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sentinel-failover.json").write_text(json.dumps(report, indent=2) + "\n")
    print("sentinel failover:", json.dumps(report))
    # The node noticed the new history and replayed its journal's last minutes.
    resolver_log = (stack.dir / "resolver.log").read_text()  # type: ignore[attr-defined]
    assert "Redis's history changed" in resolver_log
