"""The operators' status page (/admin/ on the resolver, QPROXY_ADMIN_TOKEN): in a real
browser, a failed file is found with its error and retried until it is remote; without
the token there is nothing to see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import RESOLVER, NoQueue, put_local, serving, wait_state

REPO = Path(__file__).resolve().parents[2]
PLAYWRIGHT = REPO / ".cache" / "browser" / "node_modules" / "playwright-core"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / ".cache" / "reports"
TOKEN = "operator-token-0123456789"


@pytest.fixture
def admin_url(stack: Stack) -> str:
    with serving(
        stack, "resolver-admin", RESOLVER, "/healthz", {"QPROXY_ADMIN_TOKEN": TOKEN}
    ) as url:
        yield url


def failed_file(stack: Stack, error: str) -> str:
    node = Stores(stack.config, queue=NoQueue())
    key = put_local(node, b"failed, then retried\n" * 500)
    record = node.state.get(key)
    assert record is not None
    node.state.transition(key, "failed", gen=record.gen, fields={"error": error, "attempts": 8})
    return key


def test_the_page_needs_the_token(stack: Stack, admin_url: str) -> None:
    # Off unless QPROXY_ADMIN_TOKEN is set (the stack's own resolver has none).
    assert httpx.get(stack.url("resolver") + "/admin/").status_code == 404
    asked = httpx.get(admin_url + "/admin/")
    assert asked.status_code == 401 and asked.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(admin_url + "/admin/", auth=("ops", "wrong")).status_code == 401
    page = httpx.get(admin_url + "/admin/", auth=("ops", TOKEN))
    assert page.status_code == 200 and "qproxy status" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(admin_url + "/admin/api/summary", headers={"X-QProxy-Token": TOKEN}).is_success
    # A retry another site's page could make a browser send (no custom header): refused.
    forged = httpx.post(admin_url + "/admin/api/retry", auth=("ops", TOKEN), json={"keys": []})
    assert forged.status_code == 403


def test_a_failed_file_is_found_and_retried_in_a_browser(stack: Stack, admin_url: str) -> None:
    assert PLAYWRIGHT.exists(), "playwright-core is missing: `make test` installs it (npm)"
    assert os.access(CHROMIUM, os.X_OK), "chromium is missing: `make test` installs it (apt)"
    error = "RemoteError: S3 put of x failed: <script>alert(1)</script> SlowDown"
    key = failed_file(stack, error)
    SHOTS.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["node", str(REPO / "tests" / "js" / "admin_page.js"), admin_url, TOKEN, key, str(SHOTS)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PLAYWRIGHT_CORE": str(PLAYWRIGHT), "CHROMIUM": CHROMIUM},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["errors"] == [], seen
    assert seen["error"] == error  # shown as text, never run
    assert "failed" in seen["counts"]
    assert seen["state"] == "remote" and seen["stillFailed"] == 0
    wait_state(Stores(stack.config), key, "remote")
    for shot in ("admin-failed.png", "admin-retried.png"):
        assert (SHOTS / shot).stat().st_size > 10_000  # kept as the test's artifacts
