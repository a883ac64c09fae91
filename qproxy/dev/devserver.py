"""Serve an app for the demo and the tests: ``python -m qproxy.dev.devserver MODULE:ATTR``.

By default WSGI apps run under werkzeug's threaded server (it streams request bodies and
understands chunked uploads) and ASGI apps under uvicorn. ``--server`` picks the server
people run in production, so the tests can drive the middleware under each: gunicorn
(sync or gthread workers), granian and waitress for WSGI; uvicorn and granian for ASGI.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
from typing import TYPE_CHECKING, Any, cast

from werkzeug.serving import run_simple

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

WSGI_SERVERS = ("werkzeug", "gunicorn-sync", "gunicorn-gthread", "granian", "waitress")
ASGI_SERVERS = ("uvicorn", "granian")
SERVERS = tuple(dict.fromkeys(WSGI_SERVERS + ASGI_SERVERS))


def is_asgi(app: object) -> bool:
    if inspect.isfunction(app) or inspect.ismethod(app):
        return inspect.iscoroutinefunction(app)
    return inspect.iscoroutinefunction(type(app).__call__)


def _target(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr or "app")


def _is_factory(target: Any) -> bool:
    # A factory is a function of no arguments; an app takes (environ, start_response) or
    # (scope, receive, send).
    code = getattr(target, "__code__", None)
    return callable(target) and code is not None and code.co_argcount == 0


def load(spec: str) -> WSGIApplication:
    target = _target(spec)
    if _is_factory(target):
        target = target()
    return cast("WSGIApplication", target)


def _gunicorn(app: WSGIApplication, host: str, port: int, worker_class: str) -> None:
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", worker_class)
            self.cfg.set("threads", 4 if worker_class == "gthread" else 1)
            self.cfg.set("timeout", 120)

        def load(self) -> WSGIApplication:
            return app

    Server().run()


def _granian(spec: str, host: str, port: int, *, asgi: bool) -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    Server(
        spec,
        factory=_is_factory(_target(spec)),
        address=host,
        port=port,
        interface=Interfaces.ASGI if asgi else Interfaces.WSGI,
        workers=1,
        websockets=False,
    ).serve()


def serve(spec: str, host: str, port: int, server: str = "") -> None:
    """Run the app ``spec`` (``MODULE:ATTR``) under ``server`` (default: by its kind)."""
    app = load(spec)
    asgi = is_asgi(app)
    allowed = ASGI_SERVERS if asgi else WSGI_SERVERS
    server = server or allowed[0]
    if server not in allowed:
        kind = "an ASGI" if asgi else "a WSGI"
        raise SystemExit(f"devserver: {spec} is {kind} app; --server must be one of {allowed}")
    if server == "granian":
        _granian(spec, host, port, asgi=asgi)
    elif server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host=host, port=port, log_level="info")
    elif server.startswith("gunicorn-"):
        _gunicorn(app, host, port, server.removeprefix("gunicorn-"))
    elif server == "waitress":
        import waitress

        waitress.serve(app, host=host, port=port, threads=4)
    else:
        run_simple(host, port, app, threaded=True, use_reloader=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qproxy.dev.devserver", description=__doc__)
    parser.add_argument("app", help="MODULE:ATTR, a WSGI or ASGI app or a factory returning one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--server", choices=SERVERS, default="", help="default: werkzeug (WSGI), uvicorn (ASGI)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.app, args.host, args.port, args.server)


if __name__ == "__main__":
    main()
