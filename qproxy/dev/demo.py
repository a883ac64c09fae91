"""``qproxy demo``: the whole stack on this machine, one file going local -> remote.

Also the demo's WSGI app (an upload page that shows each file's state), served wrapped
in :class:`qproxy.wsgi.UploadMiddleware`.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from werkzeug.wrappers import Request, Response

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core.record import STATES
from qproxy.wsgi import UploadMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qproxy demo</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
 table{border-collapse:collapse;width:100%}td,th{padding:.3rem .5rem;border-bottom:1px solid #ddd;text-align:left}
 .remote{color:#060}.failed{color:#a00}.queued,.transferring,.local{color:#a60}
 code{font-size:13px}
</style></head><body>
<h1>qproxy demo</h1>
<p>Files you upload land on this machine's disk at once; a Celery worker moves them to S3
in the background. The links below keep working all along: nginx serves each file from the
local disk while it is local and redirects to S3 once it is remote.</p>
<form id="f" method="post" action="/upload" enctype="multipart/form-data">
 <input type="file" name="file" multiple> <button>Upload</button> <span id="msg"></span>
</form>
<h2>Resumable upload (tus)</h2>
<p>Sent in 1 MiB pieces to <code>/files/</code> with
<a href="https://github.com/tus/tus-js-client">tus-js-client</a>
(<a href="/static/tus-js-client.LICENSE">MIT</a>): pause it, or lose the connection, and it
goes on from the last piece the server stored.</p>
<p><input type="file" id="tus-file"> <button id="tus-start">Upload</button>
 <button id="tus-pause" disabled>Pause</button> <button id="tus-resume" disabled>Resume</button></p>
<p><progress id="tus-bar" max="100" value="0"></progress> <span id="tus-status">idle</span>
 <span id="tus-progress"></span></p>
<h2>Files</h2>
<table><thead><tr><th>file</th><th>key</th><th>size</th><th>state</th></tr></thead>
<tbody id="rows"></tbody></table>
<script src="/static/tus.min.js"></script>
<script>
const $=id=>document.getElementById(id);
let up=null;
function tusState(text,pausable){$('tus-status').textContent=text;
 $('tus-pause').disabled=!pausable;$('tus-resume').disabled=pausable||text==='done';}
$('tus-start').addEventListener('click',()=>{const file=$('tus-file').files[0];if(!file)return;
 up=new tus.Upload(file,{endpoint:'/files/',chunkSize:1048576,retryDelays:[0,1000,3000,5000],
  metadata:{filename:file.name,filetype:file.type||'application/octet-stream'},
  onProgress:(sent,total)=>{$('tus-bar').value=total?sent*100/total:0;},
  onChunkComplete:(size,stored,total)=>{$('tus-progress').textContent=`${stored} of ${total} bytes stored`;},
  onError:e=>tusState('error: '+e,false),
  onSuccess:()=>{tusState('done',false);load();}});
 up.start();tusState('uploading',true);});
$('tus-pause').addEventListener('click',()=>{up.abort();tusState('paused',false);});
$('tus-resume').addEventListener('click',()=>{up.start();tusState('uploading',true);});
</script>
<script>
const f=document.getElementById('f'),msg=document.getElementById('msg');
f.addEventListener('submit',async e=>{e.preventDefault();msg.textContent='uploading...';
 const r=await fetch('/upload',{method:'POST',body:new FormData(f)});
 msg.textContent=r.ok?'stored':'error '+r.status+': '+await r.text();f.reset();load();});
function esc(s){const d=document.createElement('div');d.textContent=s;return d.innerHTML}
async function load(){const r=await fetch('/api/files');const files=await r.json();
 document.getElementById('rows').innerHTML=files.map(x=>`<tr><td><a href="${esc(x.url)}">${esc(x.filename||'(no name)')}</a></td><td><code>${esc(x.key)}</code></td><td>${x.size}</td><td class="${x.state}">${x.state}</td></tr>`).join('');}
load();setInterval(load,1000);
</script></body></html>
"""


STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC = {
    "tus.min.js": "application/javascript",
    "tus-js-client.LICENSE": "text/plain",
}


class DemoApp:
    """A small app that knows nothing of S3: it gets keys in place of files."""

    def __init__(self, node: Stores) -> None:
        self.node = node

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        response = self.route(request)
        return response(environ, start_response)

    def route(self, request: Request) -> Response:
        if request.path == "/" and request.method in ("GET", "HEAD"):
            return Response(PAGE, mimetype="text/html")
        if request.path == "/upload" and request.method == "POST":
            uploads = request.environ.get("qproxy.uploads", [])
            body = {
                "keys": request.form.getlist("file"),
                "uploads": [u.as_dict() for u in uploads],
            }
            return Response(json.dumps(body), status=201, mimetype="application/json")
        if request.path == "/files/" and request.method == "POST":
            return Response("", status=201)  # a tus creation: every one is welcome here
        if request.path.startswith("/files/"):
            # The request that completed a tus upload: taking qproxy.uploads keeps it.
            uploads = request.environ.get("qproxy.uploads", [])
            return Response("", status=204 if [u.key for u in uploads] else 400)
        if request.path.startswith("/static/") and request.method in ("GET", "HEAD"):
            return self.static(request.path[len("/static/") :])
        if request.path == "/api/files":
            return Response(json.dumps(self.recent()), mimetype="application/json")
        return Response("not found\n", status=404)

    def static(self, name: str) -> Response:
        """The page's script (tus-js-client, from npm) and its licence."""
        kind = STATIC.get(name)
        if kind is None:
            return Response("not found\n", status=404)
        body = (STATIC_DIR / name).read_bytes()
        return Response(body, mimetype=kind, headers={"Cache-Control": "public, max-age=3600"})

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        state = self.node.state
        records = []
        for name in STATES:
            for key in state.keys_in_state(name, limit=limit):
                record = state.get(key)
                if record is not None and record.state != "deleted":
                    records.append({**record.as_dict(), "url": self.node.url_for(key)})
        records.sort(key=lambda r: r["created"], reverse=True)
        return records[:limit]


def make_app() -> WSGIApplication:
    stores = Stores(Config.from_env())
    return UploadMiddleware(DemoApp(stores), stores=stores)


# -- the demo runner ---------------------------------------------------------------------


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def round_trip(stack: Any, *, size: int = 16 * 1024 * 1024 + 17, timeout: float = 60.0) -> None:
    """Upload a file through the front door and follow it from local disk to S3."""
    payload = os.urandom(size)
    digest = hashlib.sha256(payload).hexdigest()
    front, files = stack.front, stack.files_url
    with httpx.Client(timeout=30) as client:
        answer = client.post(
            front + "/upload", files={"file": ("holiday photo.jpg", payload, "image/jpeg")}
        )
        answer.raise_for_status()
        key = answer.json()["keys"][0]
        say("upload", f"POST {front}/upload ({size} bytes, sha256 {digest[:16]}...)")
        say("upload", f"the app received the key {key!r} instead of the file")

        first = client.get(f"{files}/media/{key}")
        if first.status_code == 302:
            say("local", f"GET /media/{key} -> 302: the worker was faster, it is remote already")
        else:
            first.raise_for_status()
            source = first.headers.get("x-qproxy-source", "local (standalone resolver)")
            if hashlib.sha256(first.content).hexdigest() != digest:
                raise SystemExit("demo: the bytes served locally differ from the upload")
            size_read = len(first.content)
            say(
                "local", f"GET /media/{key} -> 200 from {source}, {size_read} bytes, sha256 matches"
            )

        node = Stores(stack.config)
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            record = node.state.get(key)
            current = record.state if record else "missing"
            if current != last:
                say("state", current)
                last = current
            if current == "remote":
                break
            if current == "failed" or time.monotonic() > deadline:
                raise SystemExit(
                    f"demo: transfer did not finish (state {current}: {record.error if record else ''})"
                )
            time.sleep(0.2)

        second = client.get(f"{files}/media/{key}")
        if second.status_code != 302:
            raise SystemExit(f"demo: expected a 302 to S3, got {second.status_code}")
        location = second.headers["location"]
        say("remote", f"GET /media/{key} -> 302 {location[:90]}...")
        from_s3 = client.get(location)
        from_s3.raise_for_status()
        if hashlib.sha256(from_s3.content).hexdigest() != digest:
            raise SystemExit("demo: the bytes fetched from S3 differ from the upload")
        say("remote", f"fetched {len(from_s3.content)} bytes from S3: sha256 matches the upload")

        # The app's page shows the file's state (the demo's through /api/files, the
        # examples' in their HTML).
        listing = client.get(front + "/api/files")
        json_list = listing.headers.get("content-type", "").startswith("application/json")
        if listing.status_code == 200 and json_list:
            shown = {f["key"]: f["state"] for f in listing.json()}.get(key)
        else:
            page = client.get(front + "/").text
            row = next((r for r in page.split("<tr>") if html.escape(key) in r), "")
            shown = "remote" if ">remote<" in row else None
        if shown != "remote":
            raise SystemExit(f"demo: the app's page does not show {key} as remote ({shown})")
        say("page", f"the app's page lists {key} as remote")


def export_lines(stack: Any) -> list[str]:
    """The shell lines that point the ``qproxy`` command at ``stack``."""
    env = stack.env
    names = sorted(n for n in env if n.startswith(("QPROXY_", "AWS_")))
    return [f"export {name}={shlex.quote(env[name])}" for name in names]


def run_demo(
    *,
    once: bool,
    use_nginx: bool | None,
    mode: str,
    app: str = "qproxy.dev.demo:make_app",
    base: Path | None = None,
) -> int:
    from qproxy.dev.devstack import Stack, StackError
    from qproxy.ops.nginx import find_nginx

    if use_nginx is None:
        use_nginx = find_nginx() is not None
    # The app is imported by its own process: from the folder the demo was started in.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    # Resumable uploads at /files/ (the page's tus upload), unless the environment says else.
    settings = {"PYTHONPATH": path, "QPROXY_TUS_PATH": os.environ.get("QPROXY_TUS_PATH", "/files/")}
    stack = Stack(base=base, use_nginx=use_nginx, mode=mode, app=app, settings=settings)  # type: ignore[arg-type]
    say(
        "start",
        f"starting redis-server, moto S3, a Celery worker, the resolver, {app}"
        + (", nginx" if use_nginx else ""),
    )
    if not use_nginx:
        say("start", "nginx not found: the resolver serves local files itself (standalone mode)")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a demo started from a script may inherit an ignored SIGINT.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        stack.start()
        for name, service in stack.services.items():
            say(
                "start",
                f"{name:9} pid {service.process.pid}"
                + (f"  {stack.url(name)}" if name in stack.ports else ""),
            )
        round_trip(stack)
        if once:
            say("done", "round trip complete")
            return 0
        print(
            f"\nqproxy demo is running: open {stack.front}/ to upload files and watch their state."
        )
        print("To use the qproxy command on this stack, in another shell:")
        for line in export_lines(stack):
            print(f"  {line}")
        print("  qproxy ls")
        print(f"state and logs: {stack.dir}    Ctrl-C stops everything.", flush=True)
        while all(s.alive() for s in stack.services.values()):
            time.sleep(0.5)
        dead = [n for n, s in stack.services.items() if not s.alive()]
        print(f"demo: {', '.join(dead)} stopped unexpectedly", file=sys.stderr)
        return 1
    except StackError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        logs = Path(tempfile.gettempdir()) / f"qproxy-demo-logs-{time.strftime('%Y%m%d-%H%M%S')}"
        stack.stop(keep_logs=logs)
        print(f"logs kept in {logs}", flush=True)
