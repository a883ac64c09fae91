"""``from qproxy.asgi import UploadMiddleware`` (the driver: :mod:`qproxy.drivers.asgi`)."""

from qproxy.drivers.asgi import UploadMiddleware

__all__ = ["UploadMiddleware"]
