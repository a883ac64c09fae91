"""The web server SIGKILLed in the middle of an upload."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

from qproxy.compose import Stores
from tests.faults.helpers import Accepted, fault_stack, oracle, sizes, upload_many


def test_web_server_killed_mid_upload() -> None:
    with fault_stack() as stack:
        node = Stores(stack.config)
        sent = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield b'--b0\r\nContent-Disposition: form-data; name="file"; filename="half.bin"\r\n\r\n'
            for i in range(200):
                yield os.urandom(64 * 1024)
                if i == 60:  # ~4 MiB in: past the adapters' first read and feed
                    sent.set()
                time.sleep(0.02)
            yield b"\r\n--b0--\r\n"

        def post() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    stack.url("app") + "/upload",
                    content=slow_body(),
                    headers={"Content-Type": "multipart/form-data; boundary=b0"},
                    timeout=30,
                )

        client = threading.Thread(target=post)
        client.start()
        assert sent.wait(20)
        time.sleep(0.2)
        stack.services["app"].signal(signal.SIGKILL)
        client.join()
        # The half-written file is a temp file, never committed.
        leftovers = list(node.local.pending_files())
        assert len(leftovers) == 1
        assert node.state.count("local") + node.state.count("queued") == 0
        stack.restart("app")
        accepted = Accepted()
        upload_many(stack, sizes(20, high=256 * 1024), accepted)
        result = subprocess.run(
            [sys.executable, "-m", "qproxy", "sweep", "--pending-max-age", "0", "--json"],
            env={**os.environ, **stack.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert '"pending_removed": 1' in result.stdout
        assert list(node.local.pending_files()) == []
        oracle(stack, accepted, timeout=60)
