"""Flask behind qproxy. Run: make example-flask  (or: qproxy demo --app examples.flask_app:app)

The app never sees file bytes: each file field arrives as the file's key, and the files are
already on local disk, on their way to S3. The page lists the last uploads with their state
(qproxy.status), as it changes: local, queued, transferring, remote.
"""

from collections import deque
from html import escape

from flask import Flask, jsonify, request

import qproxy
from qproxy.wsgi import UploadMiddleware

app = Flask(__name__)
RECENT: deque[str] = deque(maxlen=20)  # this process's last uploads (an example: no database)

PAGE = """<!doctype html><title>Flask + qproxy</title><meta http-equiv="refresh" content="2">
<h1>Flask + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>
<table><tr><th>file</th><th>size</th><th>state</th></tr>{rows}</table>"""


@app.get("/")
def index() -> str:
    rows = []
    for key in RECENT:
        record = qproxy.status(key) or {"filename": key, "size": 0, "state": "missing"}
        rows.append(
            f'<tr><td><a href="/media/{escape(key)}">{escape(record["filename"] or key)}</a></td>'
            f'<td>{record["size"]}</td><td class="state">{escape(record["state"])}</td></tr>'
        )
    return PAGE.format(rows="".join(rows))


@app.post("/upload")
def upload() -> tuple[object, int]:
    keys = request.form.getlist("file")  # keys, not files
    RECENT.extendleft(keys)
    uploads = request.environ.get("qproxy.uploads", [])
    files = [{"key": u.key, "name": u.filename, "size": u.size, "url": u.url} for u in uploads]
    return jsonify(keys=keys, files=files), 201


app.wsgi_app = UploadMiddleware(app.wsgi_app)  # type: ignore[method-assign]
