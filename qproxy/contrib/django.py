"""``from qproxy.contrib.django import QueuedStorage`` (the driver: :mod:`qproxy.drivers.django`)."""

from qproxy.drivers.django import (
    QueuedStorage,
    attach_meta,
    file_failed,
    file_transferred,
    send_file_failed,
    send_file_transferred,
)

__all__ = [
    "QueuedStorage",
    "attach_meta",
    "file_failed",
    "file_transferred",
    "send_file_failed",
    "send_file_transferred",
]
