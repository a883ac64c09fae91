"""FastAPI behind qproxy. Run: make example-fastapi  (or: qproxy demo --app examples.fastapi_app:app)

Form fields that were files arrive as keys (plain strings); ``scope["qproxy.uploads"]``
has the details. The page lists the last uploads with their state (qproxy.status).
"""

from collections import deque
from html import escape
from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

import qproxy
from qproxy.asgi import UploadMiddleware

api = FastAPI()
RECENT: deque[str] = deque(maxlen=20)  # this process's last uploads (an example: no database)

PAGE = """<!doctype html><title>FastAPI + qproxy</title><meta http-equiv="refresh" content="2">
<h1>FastAPI + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>
<table><tr><th>file</th><th>size</th><th>state</th></tr>{rows}</table>"""


@api.get("/", response_class=HTMLResponse)
async def index() -> str:
    rows = []
    for key in list(RECENT):
        record = await run_in_threadpool(qproxy.status, key)  # (a Redis read)
        record = record or {"filename": key, "size": 0, "state": "missing"}
        rows.append(
            f'<tr><td><a href="/media/{escape(key)}">{escape(record["filename"] or key)}</a></td>'
            f'<td>{record["size"]}</td><td class="state">{escape(record["state"])}</td></tr>'
        )
    return PAGE.format(rows="".join(rows))


@api.post("/upload", status_code=201)
async def upload(request: Request, file: Annotated[list[str], Form()]) -> dict[str, object]:
    RECENT.extendleft(file)
    uploads = request.scope.get("qproxy.uploads", [])
    files = [{"key": u.key, "name": u.filename, "size": u.size, "url": u.url} for u in uploads]
    return {"keys": file, "files": files}


app = UploadMiddleware(api)
