"""``qproxy.resolver:create_app`` for ASGI servers (the app: :mod:`qproxy.serve.resolver`)."""

from qproxy.serve.resolver import Resolver, create_app

__all__ = ["Resolver", "create_app"]
