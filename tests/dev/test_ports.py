"""The test stacks' ports: two services starting at once never get the same one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qproxy.dev.devstack import free_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_a_port_is_handed_out_once_and_never_from_the_kernels_own_range() -> None:
    # A stack takes five before any service binds: bind(0) gave S3 and the app one port.
    ports = [free_port() for _ in range(400)]
    assert len(set(ports)) == len(ports)
    assert max(ports) < _ephemeral_low()  # where bind(0) and outgoing connections take theirs


def test_each_xdist_worker_has_ports_of_its_own() -> None:
    code = "from qproxy.dev.devstack import free_port; print(*(free_port() for _ in range(300)))"

    def ports(worker: str) -> set[int]:
        env = {**os.environ, "PYTEST_XDIST_WORKER": worker}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return {int(p) for p in out.stdout.split()}

    gw0, gw1 = ports("gw0"), ports("gw1")
    assert len(gw0) == len(gw1) == 300
    assert not gw0 & gw1
