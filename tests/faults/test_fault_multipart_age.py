"""A transfer that takes longer than QPROXY_MULTIPART_MAX_AGE is not aborted under it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3

from qproxy.compose import Stores
from tests.faults.helpers import fault_stack


def test_a_transfer_longer_than_the_age_is_not_aborted(tmp_path: Path) -> None:
    """The sweep runs every 0.3 s and every upload is past the age (moto says each began in
    2010): a 128 MiB file in 5 MiB parts reaches S3 at its first attempt. Before, each
    sweep round aborted it mid-flight, and only a run faster than the rounds got through."""
    with fault_stack(QPROXY_SWEEP_INTERVAL="0.3", QPROXY_JANITOR_INTERVAL="0.3") as stack:
        data = os.urandom(128 * 1024 * 1024)
        path = tmp_path / "big.bin"
        path.write_bytes(data)
        subprocess.run(
            [sys.executable, "-m", "qproxy", "put", str(path), "--key", "slow/big.bin"],
            env={**os.environ, **stack.env},
            check=True,
            capture_output=True,
        )
        node = Stores(stack.config)
        deadline = time.monotonic() + 120
        while (rec := node.state.get("slow/big.bin")) is None or rec.state != "remote":
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
        assert rec.attempts == 1, (stack.dir / "worker.log").read_text()[-3000:]
        s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
        body = s3.get_object(Bucket="qproxy-dev", Key="slow/big.bin")["Body"].read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        assert s3.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads", []) == []
