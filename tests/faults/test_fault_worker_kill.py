"""A worker process SIGKILLed every 3 s (and restarted) while 300 uploads arrive."""

from __future__ import annotations

import signal
import time

from tests.faults.helpers import Accepted, Prober, fault_stack, oracle, running, sizes, upload_many


def test_worker_killed_every_3s_loses_nothing() -> None:
    with fault_stack() as stack:
        accepted = Accepted()
        kills = []

        def kill_and_restart() -> None:
            stack.services["worker"].signal(signal.SIGKILL)
            kills.append(time.monotonic())
            time.sleep(0.2)
            stack.restart("worker")

        with Prober(stack, accepted) as prober:
            with running(stack, "killer", 3.0, kill_and_restart):
                # Spread over ~15 s, so transfers are cut short again and again.
                upload_many(stack, sizes(300), accepted, pause=0.2)
            assert len(accepted.files) == 300, (accepted.refused, accepted.errors)
            assert len(kills) >= 4, kills
            oracle(stack, accepted, timeout=90, prober=prober)
