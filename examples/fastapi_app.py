"""FastAPI behind qproxy. Run: make example-fastapi  (or: qproxy demo --app examples.fastapi_app:app)

Form fields that were files arrive as keys (plain strings); ``scope["qproxy.uploads"]``
has the details.
"""

from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse

from qproxy.asgi import UploadMiddleware

api = FastAPI()

PAGE = """<!doctype html><title>FastAPI + qproxy</title><h1>FastAPI + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>"""


@api.get("/", response_class=HTMLResponse)
async def index() -> str:
    return PAGE


@api.post("/upload", status_code=201)
async def upload(request: Request, file: Annotated[list[str], Form()]) -> dict[str, object]:
    uploads = request.scope.get("qproxy.uploads", [])
    files = [{"key": u.key, "name": u.filename, "size": u.size, "url": u.url} for u in uploads]
    return {"keys": file, "files": files}


app = UploadMiddleware(api)
