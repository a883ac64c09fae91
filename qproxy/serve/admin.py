"""The operators' status page, on the resolver at ``/admin/`` (off unless
``QPROXY_ADMIN_TOKEN`` is set): files by state, the failed ones with their errors and a
retry button, the stuck ones, the transfer rate, the nodes.

Asked with the admin token: HTTP Basic (any user name, the token as the password: what a
browser asks for) or the ``X-QProxy-Token`` header. A retry is a POST that must carry
``X-QProxy-Admin: 1``, a header no other site's page can make a browser send (CSRF). The
page's script is a file of its own, under a CSP that runs no other.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from qproxy import metrics
from qproxy.compose import Stores
from qproxy.core.record import STATES, FileRecord
from qproxy.errors import InvalidKey, StateUnavailable
from qproxy.headers import TOKEN_HEADER
from qproxy.keys import validate_key
from qproxy.lifecycle import nodes
from qproxy.worker.sweep import retry_failed

PREFIX = "/admin"
LIST_LIMIT = 50  # failed and stuck files shown
WATCH_LIMIT = 100
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; connect-src 'self'; "
        "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


class StatusPage:
    """The ASGI app behind ``/admin/``."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.config = stores.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self.answer(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        await response(scope, receive, send)

    async def answer(self, request: Request) -> Response:
        token = self.config.admin_token
        if not token:
            return PlainTextResponse("not found\n", status_code=404)
        if not self._authorized(request, token):
            return PlainTextResponse(
                "the admin token is needed (as the password; any user name)\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="qproxy", charset="UTF-8"'},
            )
        path = request.url.path[len(PREFIX) :] or "/"
        method = request.method
        if path == "/" and method in ("GET", "HEAD"):
            return Response(PAGE, media_type="text/html; charset=utf-8")
        if path == "/admin.js" and method in ("GET", "HEAD"):
            return Response(SCRIPT, media_type="application/javascript; charset=utf-8")
        if path == "/api/summary" and method == "GET":
            watch = [k for k in request.query_params.get("watch", "").split(",") if k]
            try:
                body = await anyio.to_thread.run_sync(self.summary, watch[:WATCH_LIMIT])
            except StateUnavailable as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)
            return JSONResponse(body)
        if path == "/api/retry" and method == "POST":
            if request.headers.get("x-qproxy-admin") != "1":
                return JSONResponse({"error": "X-QProxy-Admin: 1 is required"}, status_code=403)
            try:
                asked = json.loads(await request.body())
                keys = [validate_key(str(k)) for k in asked.get("keys", [])][:WATCH_LIMIT]
            except (ValueError, AttributeError, InvalidKey) as exc:
                return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
            every = bool(asked.get("all_failed"))
            queued = await anyio.to_thread.run_sync(
                retry_failed, self.stores, None if every else keys
            )
            return JSONResponse({"queued": queued})
        return PlainTextResponse("not found\n", status_code=404)

    @staticmethod
    def _authorized(request: Request, token: str) -> bool:
        given = request.headers.get(TOKEN_HEADER, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            given = decoded.partition(":")[2]
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    def summary(self, watch: list[str]) -> dict[str, Any]:
        state = self.stores.state
        now = time.time()
        census = state.census([s for s in STATES if s != "remote"])
        stuck_before = now - self.config.stuck_seconds
        stuck = [
            key
            for name in ("local", "queued", "transferring")
            for key in state.keys_in_state(name, older_than=stuck_before, limit=LIST_LIMIT)
        ][:LIST_LIMIT]
        failed = state.keys_in_state("failed", limit=LIST_LIMIT, newest=True)
        watched: dict[str, str] = {}
        for key in watch:
            try:
                record = state.get(validate_key(key))
            except InvalidKey:
                continue
            watched[key] = record.state if record else "missing"
        return {
            "node": self.config.node_id,
            "time": now,
            "counts": {name: count for name, (count, _) in census.items()},
            "failed": [_row(r, now) for r in self._records(failed)],
            "stuck": [_row(r, now) for r in self._records(stuck)],
            "sent_bytes": metrics.total("qproxy_s3_sent_bytes_total"),
            "nodes": [
                {
                    "id": n.id,
                    "url": n.url,
                    "age": round(n.age(now), 1),
                    "draining": n.draining,
                    "gone": nodes.is_gone(self.stores, n, now),
                }
                for n in nodes.listing(self.stores)
            ],
            "watched": watched,
        }

    def _records(self, keys: list[str]) -> list[FileRecord]:
        found = (self.stores.state.get(key) for key in keys)
        return [r for r in found if r is not None]


def _row(record: FileRecord, now: float) -> dict[str, Any]:
    return {
        "key": record.key,
        "filename": record.filename,
        "size": record.size,
        "state": record.state,
        "attempts": record.attempts,
        "error": record.error,
        "node": record.node,
        "age": round(now - record.updated, 1),
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qproxy status</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem}
 table{border-collapse:collapse;width:100%;margin-bottom:1.5rem}
 td,th{padding:.25rem .5rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
 .error{color:#a00;font-family:monospace;font-size:12px}.remote{color:#060}
 .failed{color:#a00}.num{text-align:right}
</style></head><body>
<h1>qproxy status <small id="node"></small></h1>
<p>Transfer rate: <b id="rate">-</b> &middot; updated <span id="updated">-</span></p>
<h2>Files by state</h2><table id="counts"></table>
<h2>Failed <button id="retry-all" type="button">Retry all failed</button></h2>
<table id="failed"><thead><tr><th>file</th><th>key</th><th class="num">size</th>
<th class="num">attempts</th><th>error</th><th></th></tr></thead><tbody></tbody></table>
<h2>Retried</h2>
<table id="watched"><thead><tr><th>key</th><th>state</th></tr></thead><tbody></tbody></table>
<h2>Stuck (no progress for a while)</h2>
<table id="stuck"><thead><tr><th>file</th><th>key</th><th>state</th><th class="num">age (s)</th>
</tr></thead><tbody></tbody></table>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>url</th><th class="num">last seen (s)</th>
<th>status</th></tr></thead><tbody></tbody></table>
<script src="admin.js"></script>
</body></html>
"""

SCRIPT = r"""'use strict';
const watch = new Set();
let last = null;
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function size(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}
async function retry(keys, all) {
  const body = JSON.stringify(all ? {all_failed: true} : {keys: keys});
  const r = await fetch('api/retry', {method: 'POST', body: body,
    headers: {'Content-Type': 'application/json', 'X-QProxy-Admin': '1'}});
  const done = await r.json();
  for (const k of (done.queued || [])) watch.add(k);
  refresh();
}
function fill(id, rows, draw) {
  const body = document.querySelector('#' + id + ' tbody'); body.textContent = '';
  for (const item of rows) draw(body.insertRow(), item);
}
async function refresh() {
  const r = await fetch('api/summary?watch=' + encodeURIComponent([...watch].join(',')));
  if (!r.ok) { document.getElementById('updated').textContent = 'error ' + r.status; return; }
  const s = await r.json();
  document.getElementById('node').textContent = '(' + s.node + ')';
  document.getElementById('updated').textContent = new Date(s.time * 1000).toLocaleTimeString();
  if (last && s.time > last.time) {
    const rate = Math.max(0, s.sent_bytes - last.sent_bytes) / (s.time - last.time);
    document.getElementById('rate').textContent = size(rate) + '/s to S3';
  }
  last = s;
  const counts = document.getElementById('counts'); counts.textContent = '';
  for (const [name, n] of Object.entries(s.counts)) {
    const row = counts.insertRow(); cell(row, name, name); cell(row, n, 'num');
  }
  fill('failed', s.failed, (row, f) => {
    row.dataset.key = f.key;
    cell(row, f.filename || '-'); cell(row, f.key); cell(row, size(f.size), 'num');
    cell(row, f.attempts, 'num'); cell(row, f.error, 'error');
    const b = document.createElement('button'); b.type = 'button'; b.textContent = 'Retry';
    b.className = 'retry'; b.addEventListener('click', () => retry([f.key], false));
    row.insertCell().appendChild(b);
  });
  fill('watched', Object.entries(s.watched), (row, [key, state]) => {
    row.dataset.key = key; cell(row, key); cell(row, state, 'state ' + state);
  });
  fill('stuck', s.stuck, (row, f) => {
    cell(row, f.filename || '-'); cell(row, f.key); cell(row, f.state); cell(row, f.age, 'num');
  });
  fill('nodes', s.nodes, (row, n) => {
    cell(row, n.id); cell(row, n.url); cell(row, n.age, 'num');
    cell(row, n.gone ? 'gone' : n.draining ? 'draining' : 'up');
  });
}
document.getElementById('retry-all').addEventListener('click', () => retry([], true));
refresh(); setInterval(refresh, 1000);
"""
