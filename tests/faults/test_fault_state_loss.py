"""Redis loses everything (FLUSHALL) in the middle of a run; `qproxy reconcile` restores it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import redis

from tests.faults.helpers import (
    Accepted,
    Prober,
    fault_stack,
    oracle,
    sizes,
    upload_many,
    wait_all_remote,
)


def test_flushall_then_reconcile() -> None:
    # Local copies dropped right after the transfer, so some files exist only in S3.
    with fault_stack(QPROXY_KEEP_LOCAL_SECONDS="0") as stack:
        accepted = Accepted()
        with Prober(stack, accepted) as prober:
            upload_many(stack, sizes(40, high=1024 * 1024), accepted)
            wait_all_remote(stack, accepted.keys()[:20], 30)
            time.sleep(6)  # past the drop grace: local copies of remote files are gone
            loader = threading.Thread(
                target=upload_many, args=(stack, sizes(40, high=1024 * 1024, seed=5), accepted)
            )
            loader.start()
            time.sleep(0.5)
            redis.Redis.from_url(stack.config.redis_url).flushall()
            loader.join()
            result = subprocess.run(
                [sys.executable, "-m", "qproxy", "reconcile", "--json"],
                env={**os.environ, **stack.env},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stderr
            assert len(accepted.files) == 80
            oracle(stack, accepted, timeout=90, prober=prober)
        # The resolver served every key throughout: no 404 for a file that exists.
        assert prober.bad == [], prober.bad[:5]
        assert prober.statuses[200] + prober.statuses[302] > 50
