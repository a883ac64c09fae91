"""`qproxy demo`: the round trip, the page, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


REPO = Path(__file__).resolve().parents[2]
PLAYWRIGHT = REPO / ".cache" / "browser" / "node_modules" / "playwright-core"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def browser_upload(url: str, source: Path) -> dict[str, Any]:
    """tests/js/demo_page.js: the page's resumable upload in headless Chromium."""
    assert PLAYWRIGHT.exists(), "playwright-core is missing: `make test` installs it (npm)"
    assert os.access(CHROMIUM, os.X_OK), "chromium is missing: `make test` installs it (apt)"
    done = subprocess.run(
        ["node", str(REPO / "tests" / "js" / "demo_page.js"), url, str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PLAYWRIGHT_CORE": str(PLAYWRIGHT), "CHROMIUM": CHROMIUM},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def demo_file(url: str, filename: str) -> dict[str, Any] | None:
    files = httpx.get(url + "/api/files").json()
    return next((f for f in files if f["filename"] == filename), None)


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
        # The lines to point the qproxy command at the running stack, which work.
        exports = {}
        while (line := proc.stdout.readline()) and "state and logs:" not in line:
            lines.append(line)
            if line.strip().startswith("export "):
                name, _, value = line.strip().removeprefix("export ").partition("=")
                exports[name] = shlex.split(value)[0]
        assert {"QPROXY_REDIS_URL", "QPROXY_LOCAL_ROOT", "QPROXY_S3_ENDPOINT_URL"} <= set(exports)
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("QPROXY_")}
        listed = subprocess.run(
            [sys.executable, "-m", "qproxy", "ls"], capture_output=True, text=True,
            env={**cli_env, **exports}, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0 and "holiday photo.jpg" in listed.stdout, listed
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "qproxy demo" in page.text
        up = httpx.post(
            url + "/upload", files={"file": ("page.txt", b"from the page", "text/plain")}
        )
        assert up.status_code == 201
        key = up.json()["keys"][0]
        files = httpx.get(url + "/api/files").json()
        assert key in [f["key"] for f in files]
        # The page's resumable upload, in a real browser: paused with two pieces stored,
        # resumed from there (a HEAD, then the PATCH at 2 MiB), and on to S3.
        data = os.urandom(5 * 1024 * 1024 + 4321)
        name = f"browser-{os.urandom(4).hex()}.bin"
        source = demo_tmp / name
        source.write_bytes(data)
        seen = browser_upload(url, source)
        mib = 1024 * 1024
        assert seen["errors"] == [] and seen["status"] == "done", seen
        assert seen["pausedAt"] == f"{2 * mib} of {len(data)} bytes stored", seen
        assert seen["patches"] == [0, mib, 2 * mib, 2 * mib, 3 * mib, 4 * mib, 5 * mib], seen
        assert seen["whilePaused"] == {"patches": 3, "heads": 0}, seen
        assert seen["heads"] >= 1, seen  # resumed: it asked the server for the offset
        deadline = time.monotonic() + 60
        while (found := demo_file(url, name)) is None or found["state"] != "remote":
            assert time.monotonic() < deadline, found
            time.sleep(0.3)
        assert found["size"] == len(data)
        assert found["sha256"] == hashlib.sha256(data).hexdigest()
        served = httpx.get(url + found["url"], follow_redirects=True)
        assert served.content == data
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        # The logs outlive the stack, and it says where.
        kept = re.search(r"logs kept in (\S+)", rest)
        assert kept, rest
        assert (Path(kept.group(1)) / "worker.log").stat().st_size > 0
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
    assert "the app's page lists" in result.stdout  # its page shows the state too
    assert processes_under(demo_tmp) == []


def test_the_page_script_is_npm_s_tus_js_client_with_its_licence() -> None:
    # `make static` copies it from npm (the version tests/drivers/test_tus.py runs too).
    static = REPO / "qproxy" / "dev" / "static"
    npm = REPO / ".cache" / "tusjs" / "node_modules" / "tus-js-client"
    assert npm.exists(), "tus-js-client is missing: `make test` installs it (npm)"
    assert (static / "tus.min.js").read_bytes() == (npm / "dist" / "tus.min.js").read_bytes()
    version = json.loads((npm / "package.json").read_text())["version"]
    licence = (static / "tus-js-client.LICENSE").read_text()
    assert f"tus-js-client {version}" in licence
    assert (npm / "LICENSE").read_text() in licence
