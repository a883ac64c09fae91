"""``from qproxy.wsgi import UploadMiddleware`` (the driver: :mod:`qproxy.drivers.wsgi`)."""

from qproxy.drivers.wsgi import UploadMiddleware

__all__ = ["UploadMiddleware"]
