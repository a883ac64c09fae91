"""``from qproxy.contrib.django import QueuedStorage`` (the driver: :mod:`qproxy.drivers.django`)."""

from qproxy.drivers.django import QueuedStorage, attach_meta

__all__ = ["QueuedStorage", "attach_meta"]
