"""The local disk fills up (a small tmpfs as the local root)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import tmpfs
from tests.faults.helpers import Accepted, MiB, fault_stack, oracle, sizes, upload_many

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_disk_full_is_507_and_recovers() -> None:
    base = Path(tempfile.mkdtemp(prefix="qproxy-tmpfs-"))
    os.chmod(base, 0o755)
    with tmpfs(base / "disk", size="8m") as mount:
        settings = {"QPROXY_LOCAL_ROOT": str(mount / "files"), "QPROXY_KEEP_LOCAL_SECONDS": "0"}
        with fault_stack(**settings) as stack:
            accepted = Accepted()
            upload_many(stack, sizes(5, high=256 * 1024), accepted)
            big = os.urandom(12 * MiB)
            r = httpx.post(stack.front + "/upload", files={"file": ("big.bin", big)}, timeout=60)
            assert r.status_code == 507
            assert r.text == "local disk full: the upload could not be stored\n"
            assert list((mount / "files" / ".qp" / "tmp").iterdir()) == []  # partial file removed
            # Space is back (the big file went, the small ones move to S3 and are dropped):
            time.sleep(1)
            upload_many(stack, sizes(20, high=256 * 1024, seed=11), accepted)
            assert len(accepted.files) == 25, accepted.refused
            oracle(stack, accepted, timeout=60)
    base.rmdir()
