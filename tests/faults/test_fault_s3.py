"""The S3 endpoint stops answering (SIGSTOP) for 20 s while uploads arrive."""

from __future__ import annotations

import signal
import time

import httpx

from qproxy.compose import Stores
from tests.faults.helpers import Accepted, Prober, fault_stack, oracle, sizes, upload_many


def test_s3_paused_20s() -> None:
    with fault_stack() as stack:
        accepted = Accepted()
        s3 = stack.services["s3"]
        with Prober(stack, accepted) as prober:
            s3.signal(signal.SIGSTOP)
            paused = time.monotonic()
            try:
                upload_many(stack, sizes(100, high=2 * 1024 * 1024), accepted)
                assert len(accepted.files) == 100, (accepted.refused, accepted.errors)
                # Served from the local disk while S3 is away.
                for key in accepted.keys()[:10]:
                    r = httpx.get(f"{stack.files_url}/media/{key}", timeout=10)
                    assert r.status_code == 200 and r.headers["x-qproxy-source"] == "local"
                time.sleep(max(0.0, 20 - (time.monotonic() - paused)))
                node = Stores(stack.config)
                states = {node.state.get(k).state for k in accepted.files}  # type: ignore[union-attr]
                assert "failed" not in states and "remote" not in states, states
            finally:
                s3.signal(signal.SIGCONT)
            oracle(stack, accepted, timeout=90, prober=prober)


def test_resolver_answers_while_s3_hangs() -> None:
    """A miss asks S3 (Redis may have lost the record); an S3 that hangs must not hang the
    resolver: nginx gets its answer within the resolver's own S3 timeout, every time."""
    with fault_stack() as stack:
        s3 = stack.services["s3"]
        s3.signal(signal.SIGSTOP)
        try:
            for name in ("2026/01/01/gone.bin", "2026/01/01/also-gone.bin"):
                # botocore's defaults (60 s read timeout, 3 attempts) would hang this for
                # minutes; httpx gives up after 10 s.
                r = httpx.get(f"{stack.files_url}/media/{name}", timeout=10)
                assert r.status_code == 404
            # Files are still served: alive and ready, S3 reported as degraded.
            assert httpx.get(stack.url("resolver") + "/healthz", timeout=10).status_code == 200
            ready = httpx.get(stack.url("resolver") + "/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["s3"] is False and ready.json()["degraded"] == ["s3"]
        finally:
            s3.signal(signal.SIGCONT)
