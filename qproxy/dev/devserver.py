"""Serve an app for the demo and the tests: ``python -m qproxy.dev.devserver MODULE:ATTR``.

WSGI apps run under werkzeug's threaded server (it streams request bodies and understands
chunked uploads), ASGI apps under uvicorn. In production use gunicorn/uvicorn directly.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
from typing import TYPE_CHECKING, cast

from werkzeug.serving import run_simple

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


def is_asgi(app: object) -> bool:
    if inspect.isfunction(app) or inspect.ismethod(app):
        return inspect.iscoroutinefunction(app)
    return inspect.iscoroutinefunction(type(app).__call__)


def load(spec: str) -> WSGIApplication:
    module_name, _, attr = spec.partition(":")
    target = getattr(importlib.import_module(module_name), attr or "app")
    # A factory (a function of no arguments) or the app itself.
    if (
        callable(target)
        and getattr(target, "__code__", None) is not None
        and target.__code__.co_argcount == 0
    ):
        target = target()
    return cast("WSGIApplication", target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qproxy.dev.devserver", description=__doc__)
    parser.add_argument("app", help="MODULE:ATTR, a WSGI or ASGI app or a factory returning one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = load(args.app)
    if is_asgi(app):
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    else:
        run_simple(args.host, args.port, app, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
