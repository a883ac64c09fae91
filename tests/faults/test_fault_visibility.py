"""A transfer that outlives the broker's visibility timeout runs twice at once."""

from __future__ import annotations

import signal
import time

import boto3
import httpx

from qproxy.compose import Stores
from tests.faults.helpers import MiB, fault_stack


def test_a_redelivered_transfer_is_fenced() -> None:
    settings = {
        "QPROXY_VISIBILITY_TIMEOUT": "3",
        "QPROXY_RETRY_BACKOFF_MAX": "2",
        "QPROXY_LEASE_SECONDS": "120",
        "QPROXY_STUCK_SECONDS": "600",  # only Celery's redelivery runs it again here
    }
    with fault_stack(**settings) as stack:
        node = Stores(stack.config)
        s3 = stack.services["s3"]
        s3.signal(signal.SIGSTOP)  # the first run hangs in its upload...
        try:
            r = httpx.post(
                stack.front + "/upload", files={"file": ("slow.bin", b"x" * (8 * MiB))}, timeout=60
            )
            assert r.status_code == 201
            key = r.json()["keys"][0]
            deadline = time.monotonic() + 20
            while (rec := node.state.get(key)) is None or rec.state != "transferring":
                assert time.monotonic() < deadline, rec
                time.sleep(0.1)
            # ...past the visibility timeout: Redis hands the unacknowledged job out again.
            log = stack.dir / "worker.log"
            deadline = time.monotonic() + 30
            while "another run holds the lease" not in log.read_text():
                assert time.monotonic() < deadline, "the job was not redelivered"
                time.sleep(0.2)
        finally:
            s3.signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while (rec := node.state.get(key)) is None or rec.state != "remote":
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
        time.sleep(2)
        text = log.read_text()
        assert text.count(f"transfer {key}: remote (") == 1  # one remote transition
        s3c = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
        listed = [o["Key"] for o in s3c.list_objects_v2(Bucket="qproxy-dev").get("Contents", [])]
        assert listed == [key]  # exactly one object
        assert s3c.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads", []) == []
        assert httpx.get(
            f"{stack.files_url}/media/{key}", follow_redirects=True
        ).content == b"x" * (8 * MiB)
