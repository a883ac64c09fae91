"""`qproxy demo`: the round trip, the page, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import needs_nginx


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qproxy-demo-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_under(path: Path) -> list[str]:
    """Processes started in (or naming) the demo's folder: they must all be gone."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(path)) or str(path) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def demo_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}


@needs_nginx
def test_demo_once_through_nginx(demo_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=180,
        env=demo_env(demo_tmp),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the app received the key" in out
    assert "-> 200 from local" in out or "the worker was faster" in out
    assert "[state] remote" in out
    assert "-> 302 http://127.0.0.1:" in out
    assert "sha256 matches the upload" in out
    assert processes_under(demo_tmp) == []


def test_demo_once_without_nginx(demo_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "demo", "--once", "--no-nginx"],
        capture_output=True,
        text=True,
        timeout=180,
        env=demo_env(demo_tmp),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standalone mode" in result.stdout
    assert "sha256 matches the upload" in result.stdout
    assert processes_under(demo_tmp) == []


def test_demo_runs_until_ctrl_c(demo_tmp: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qproxy", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(demo_tmp),
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "qproxy demo is running: open " in line:
                url = line.split("open ", 1)[1].split(" ", 1)[0].rstrip("/")
                break
        assert url, "".join(lines)
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "qproxy demo" in page.text
        up = httpx.post(
            url + "/upload", files={"file": ("page.txt", b"from the page", "text/plain")}
        )
        assert up.status_code == 201
        key = up.json()["keys"][0]
        files = httpx.get(url + "/api/files").json()
        assert key in [f["key"] for f in files]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    time.sleep(0.5)
    assert processes_under(demo_tmp) == []


@pytest.mark.parametrize(
    "app", ["examples.flask_app:app", "examples.fastapi_app:app", "examples.django_app:app"]
)
def test_examples_run_on_the_whole_stack(demo_tmp: Path, app: str) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "demo", "--once", "--app", app],
        capture_output=True,
        text=True,
        timeout=180,
        env=demo_env(demo_tmp),
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the app received the key" in result.stdout
    assert "sha256 matches the upload" in result.stdout
    assert processes_under(demo_tmp) == []
