"""Flask behind qproxy. Run: make example-flask  (or: qproxy demo --app examples.flask_app:app)

The app never sees file bytes: each file field arrives as the file's key, and the files are
already on local disk, on their way to S3.
"""

from flask import Flask, jsonify, request

from qproxy.wsgi import UploadMiddleware

app = Flask(__name__)

PAGE = """<!doctype html><title>Flask + qproxy</title><h1>Flask + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>"""


@app.get("/")
def index() -> str:
    return PAGE


@app.post("/upload")
def upload() -> tuple[object, int]:
    keys = request.form.getlist("file")  # keys, not files
    uploads = request.environ.get("qproxy.uploads", [])
    files = [{"key": u.key, "name": u.filename, "size": u.size, "url": u.url} for u in uploads]
    return jsonify(keys=keys, files=files), 201


app.wsgi_app = UploadMiddleware(app.wsgi_app)  # type: ignore[method-assign]
