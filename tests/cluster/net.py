"""Hosts on one machine: network namespaces on a private bridge, made and removed here.

Each :class:`Host` is a network namespace with one interface (``eth0``) on a bridge that
lives in a namespace of its own (the "switch"), so no traffic of the test touches the
machine's own network. A process runs on a host through ``ip netns exec``; Python code of
the test runs there in a thread that entered the namespace (``setns``: a thread's network
namespace is its own), so its sockets are the host's.

Names: ``/etc/netns/<namespace>/hosts`` is what ``ip netns exec`` shows a process as its
``/etc/hosts``: every host gets the same table, so node URLs can use names.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def can_make_namespaces() -> str:
    """Why network namespaces cannot be made here ('' if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"qpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str  # short: "web1"
    namespace: str
    address: str
    lan: str  # the switch's namespace
    _pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def exec(self) -> list[str]:
        """Prefix of a command run on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` in a thread on this host's network (its sockets are the host's)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=8,
                thread_name_prefix=f"netns-{self.name}",
                initializer=_enter,
                initargs=(f"/run/netns/{self.namespace}",),
            )
        return self._pool.submit(fn, *args, **kwargs).result()

    def cut(self) -> None:
        """Unplug the host from the switch (it and its peers see no answer, no refusal)."""
        _ip("-n", self.lan, "link", "set", f"p-{self.name}", "down")

    def plug(self) -> None:
        _ip("-n", self.lan, "link", "set", f"p-{self.name}", "up")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Net:
    """A switch and the hosts on it (10.233.0.0/24), removed on :meth:`close`."""

    prefix: str = field(default_factory=lambda: f"qp{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # extra host names -> address

    def __post_init__(self) -> None:
        self.lan = f"{self.prefix}-lan"
        _ip("netns", "add", self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.lan, "link", "set", "br0", "up")

    def add(self, name: str, last_octet: int) -> Host:
        namespace = f"{self.prefix}-{name}"
        address = f"10.233.0.{last_octet}"
        _ip("netns", "add", namespace)
        _ip(
            "-n", self.lan, "link", "add", f"p-{name}", "type", "veth",
            "peer", "name", "eth0", "netns", namespace,
        )  # fmt: skip
        _ip("-n", self.lan, "link", "set", f"p-{name}", "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        host = Host(name, namespace, address, self.lan)
        self.hosts[name] = host
        self._write_hosts()
        return host

    def name(self, name: str, address: str) -> None:
        """Another name for an address, in every host's /etc/hosts."""
        self.names[name] = address
        self._write_hosts()

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.address} {h.name}" for h in self.hosts.values()]
        lines += [f"{a} {n}" for n, a in self.names.items()]
        for host in self.hosts.values():
            folder = Path("/etc/netns") / host.namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", host.namespace)
            shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", self.lan)


@contextlib.contextmanager
def network() -> Iterator[Net]:
    net = Net()
    try:
        yield net
    finally:
        net.close()
