"""Django with QueuedStorage, in one file. Run: make example-django
(or: qproxy demo --app examples.django_app:app)

Here Django parses the upload itself and saves each file through QueuedStorage: local
disk now, S3 in the background, one URL (/media/<name>) all along.
"""

from collections import deque
from html import escape

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    QPROXY={"PUBLIC_PATH": "/media/"},
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

import qproxy  # noqa: E402
from qproxy.contrib.django import QueuedStorage  # noqa: E402

storage = QueuedStorage()

RECENT: deque[str] = deque(maxlen=20)  # this process's last uploads (an example: no database)

PAGE = """<!doctype html><title>Django + qproxy</title><meta http-equiv="refresh" content="2">
<h1>Django + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>
<table><tr><th>file</th><th>size</th><th>state</th></tr>{rows}</table>"""


def index(request: HttpRequest) -> HttpResponse:
    rows = []
    for name in RECENT:
        record = qproxy.status(name) or {"filename": name, "size": 0, "state": "missing"}
        rows.append(
            f'<tr><td><a href="{escape(storage.url(name))}">{escape(name)}</a></td>'
            f'<td>{record["size"]}</td><td class="state">{escape(record["state"])}</td></tr>'
        )
    return HttpResponse(PAGE.format(rows="".join(rows)))


@csrf_exempt  # an example; keep CSRF protection in a real app
def upload(request: HttpRequest) -> JsonResponse:
    keys = [storage.save(f"uploads/{f.name}", f) for f in request.FILES.getlist("file")]
    RECENT.extendleft(keys)
    files = [{"key": k, "url": storage.url(k), "size": storage.size(k)} for k in keys]
    return JsonResponse({"keys": keys, "files": files}, status=201)


urlpatterns = [path("", index), path("upload", upload)]
app = get_wsgi_application()
