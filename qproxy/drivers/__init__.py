"""Thin drivers over the core and the stores: the WSGI and ASGI middlewares
(``qproxy.wsgi``, ``qproxy.asgi``) and the Django storage (``qproxy.contrib.django``)."""
