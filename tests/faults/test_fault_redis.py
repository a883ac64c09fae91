"""Redis killed (SIGKILL, restarted from its AOF) or stopped while uploads arrive."""

from __future__ import annotations

import signal
import threading
import time

from qproxy.dev.devstack import Stack
from tests.faults.helpers import Accepted, Prober, fault_stack, oracle, sizes, upload_many


def assert_worker_said_nothing_odd(stack: Stack) -> None:
    """The worker lost its broker and got it back, and its log says so in its own words:
    no deprecation warning of Celery's to puzzle an operator at each loss."""
    log = (stack.dir / "worker.log").read_text()
    assert "Connection to broker lost" in log  # it really did lose it
    assert "DeprecationWarning" not in log


def test_redis_killed_twice_loses_no_accepted_upload() -> None:
    with fault_stack() as stack:
        accepted = Accepted()
        done = threading.Event()

        def kill_twice() -> None:
            for _ in range(2):
                time.sleep(3)
                stack.services["redis"].signal(signal.SIGKILL)
                time.sleep(1.5)  # uploads keep coming while Redis is gone
                stack.restart("redis")
            done.set()

        killer = threading.Thread(target=kill_twice)
        with Prober(stack, accepted) as prober:
            killer.start()
            upload_many(stack, sizes(200, high=2 * 1024 * 1024), accepted, pause=0.15)
            killer.join()
            assert done.is_set()
            # Every upload was accepted: the journal, not Redis, makes an upload durable.
            assert len(accepted.files) == 200, (accepted.refused, accepted.errors)
            oracle(stack, accepted, timeout=90, prober=prober)
            app_log = (stack.dir / "app.log").read_text()
            assert "stored locally but not queued yet" in app_log  # Redis really was down
            assert_worker_said_nothing_odd(stack)


def test_redis_stopped_during_uploads() -> None:
    with fault_stack() as stack:
        accepted = Accepted()
        with Prober(stack, accepted) as prober:
            upload_many(stack, sizes(20, high=512 * 1024), accepted)
            stack.services["redis"].stop()  # a clean stop (SIGTERM)
            upload_many(stack, sizes(40, high=512 * 1024, seed=3), accepted)
            assert len(accepted.files) == 60, (accepted.refused, accepted.errors)
            time.sleep(2)
            stack.restart("redis")
            # The records and the jobs follow from the journal once Redis is back.
            oracle(stack, accepted, timeout=90, prober=prober)
            # Redis really was down for the 40: their records came from the journal replay.
            app_log = (stack.dir / "app.log").read_text()
            assert app_log.count("stored locally but not queued yet") >= 40
            assert_worker_said_nothing_odd(stack)
