"""Re-uploads under the same key, and deletes while a transfer is running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx

from qproxy.compose import Stores
from qproxy.lifecycle.files import delete
from tests.faults.helpers import fault_stack


def put(stack: object, path: Path, key: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "qproxy", "put", str(path), "--key", key, "--replace"],
        env={**os.environ, **stack.env},  # type: ignore[attr-defined]
        check=True,
        capture_output=True,
    )


def objects(stack: object) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")  # type: ignore[attr-defined]
    return {o["Key"] for o in s3.list_objects_v2(Bucket="qproxy-dev").get("Contents", [])}


def served(stack: object, key: str) -> bytes:
    return httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True, timeout=30).content  # type: ignore[attr-defined]


def test_newest_upload_wins_and_no_orphan(tmp_path: Path) -> None:
    with fault_stack() as stack:
        node = Stores(stack.config)
        key = "docs/report.pdf"
        versions = [os.urandom(3 * 1024 * 1024 + i) for i in range(4)]
        for i, data in enumerate(versions):
            path = tmp_path / f"v{i}.pdf"
            path.write_bytes(data)
            put(stack, path, key)
            # From the moment a version is accepted, only its bytes are ever served.
            assert served(stack, key) == data
            if i == 1:
                time.sleep(3)  # let v2 reach S3 before v3 and v4 replace it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            record = node.state.get(key)
            if (
                record
                and record.state == "remote"
                and not record.stale
                and objects(stack) == {record.object}
            ):
                break
            time.sleep(0.3)
        record = node.state.get(key)
        assert record is not None and record.state == "remote" and record.version == 4
        assert objects(stack) == {record.object}  # older versions' objects are gone
        assert served(stack, key) == versions[-1]
        assert httpx.get(f"{stack.files_url}/media/{key}").status_code == 302


def test_delete_while_transferring_leaves_nothing(tmp_path: Path) -> None:
    with fault_stack() as stack:
        node = Stores(stack.config)
        path = tmp_path / "big.bin"
        path.write_bytes(os.urandom(12 * 1024 * 1024))
        s3 = stack.services["s3"]
        s3.signal(signal.SIGSTOP)  # the transfer starts and hangs mid-flight
        try:
            put(stack, path, "big/one.bin")
            deadline = time.monotonic() + 20
            while (rec := node.state.get("big/one.bin")) is None or rec.state != "transferring":
                assert time.monotonic() < deadline, rec
                time.sleep(0.1)
            assert delete(node, "big/one.bin")
            assert httpx.get(f"{stack.files_url}/media/big/one.bin").status_code == 404
        finally:
            s3.signal(signal.SIGCONT)
        # The end is when the worker's run has ended, not when the record is gone: the
        # purge can forget the record while that run still uploads its parts (seen in CI: an
        # open multipart upload listed before the run aborted it). Each way the run can end
        # (its upload completed or aborted under it) is a lost lease, and it logs that.
        boto = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
        log = stack.dir / "worker.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                "transfer big/one.bin: lease conflict" in log.read_text()
                and node.state.get("big/one.bin") is None
                and not objects(stack)
                and not node.local.exists("big/one.bin")
                and not boto.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads")
            ):
                break
            time.sleep(0.3)
        assert "transfer big/one.bin: lease conflict" in log.read_text()
        assert node.state.get("big/one.bin") is None
        assert objects(stack) == set()
        assert not node.local.exists("big/one.bin")
        assert boto.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads", []) == []
        assert httpx.get(f"{stack.files_url}/media/big/one.bin").status_code == 404
