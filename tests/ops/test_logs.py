"""Logs: a line each with its time and level, as text or JSON lines (QPROXY_LOG_FORMAT),
and every transfer line says which file, node, generation, attempt and how long."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack, free_port
from tests.conftest import wait_state

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def sweep_lines(stack: Stack, log_format: str) -> list[str]:
    # S3 refuses connections: the sweep's multipart listing fails and says so.
    env = {**os.environ, **stack.env, "QPROXY_LOG_FORMAT": log_format,
           "QPROXY_S3_ENDPOINT_URL": "http://127.0.0.1:1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "qproxy", "sweep"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("cannot list multipart uploads" in line for line in lines), done.stderr
    return lines


def test_every_sweep_line_has_its_time_and_level(stack: Stack) -> None:
    for line in sweep_lines(stack, "text"):
        assert re.match(rf"{TIME} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", line), line
    for line in sweep_lines(stack, "json"):
        entry = json.loads(line)
        assert re.fullmatch(TIME, entry["time"]) and entry["level"] in ("info", "warning", "error")
        assert entry["logger"] and entry["message"]


def test_a_json_workers_transfer_line_names_the_file_and_the_attempt(stack: Stack) -> None:
    log_path = stack.dir / "worker-json.log"
    metrics_port = free_port()  # (and its metrics, served on a port of its own)
    argv = [sys.executable, "-m", "qproxy", "worker", "--concurrency", "1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--hostname", f"json-{time.time_ns()}@%h",
            "--metrics-port", str(metrics_port)]  # fmt: skip
    stack.spawn("worker-json", argv, env={"QPROXY_LOG_FORMAT": "json"})
    # The stack's worker stops (a stopped one would still have taken the job: its pending
    # BRPOP): the JSON worker takes the transfer. Started again after.
    stack.services.pop("worker").stop()
    try:
        stack.wait_for("worker-json", lambda: b"ready." in log_path.read_bytes(), timeout=60)
        data = b"logged\n" * 100
        answer = httpx.post(f"{stack.front}/upload", files={"file": ("l.txt", data)}, timeout=30)
        (key,) = answer.json()["keys"]
        wait_state(Stores(stack.config), key, "remote")
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        remote = re.search(r'^qproxy_transfers_total\{outcome="remote"\} (\S+)$', scraped, re.M)
        assert remote and float(remote.group(1)) >= 1, scraped[:2000]
    finally:
        stack.services.pop("worker-json").stop()
        stack.start_worker()
    entries = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    assert any("ready." in e["message"] for e in entries)  # Celery's own lines too
    (done,) = [e for e in entries if e.get("key") == key and e.get("state") == "remote"]
    assert done["level"] == "info" and done["node"] == "node-1"
    assert done["attempt"] == 1 and done["gen"] >= 1 and done["size"] == len(data)
    assert done["duration_ms"] >= 0 and re.fullmatch(TIME, done["time"])
    # One line a file: Celery's own for each job ("received", "succeeded in") say less.
    per_job = [e["message"] for e in entries if e["logger"].startswith("celery.")]
    assert not [m for m in per_job if " received" in m or "succeeded in" in m], per_job
