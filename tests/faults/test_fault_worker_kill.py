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
            sent = 0
            with running(stack, "killer", 3.0, kill_and_restart):
                # Spread over ~15 s, so transfers are cut short again and again; more after
                # that until the worker died 4 times (each restart waits for the worker to
                # be ready, which takes longer on a busy machine).
                while sent == 0 or len(kills) < 4:
                    batch = sizes(300 if sent == 0 else 40, seed=sent)
                    upload_many(stack, batch, accepted, pause=0.2)
                    sent += len(batch)
                    assert sent < 1000, kills
            assert len(accepted.files) == sent, (accepted.refused, accepted.errors)
            assert len(kills) >= 4, kills
            oracle(stack, accepted, timeout=90, prober=prober)
