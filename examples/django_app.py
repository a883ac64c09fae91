"""Django with QueuedStorage, in one file. Run: make example-django
(or: qproxy demo --app examples.django_app:app)

Here Django parses the upload itself and saves each file through QueuedStorage: local
disk now, S3 in the background, one URL (/media/<name>) all along.
"""

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

from qproxy.contrib.django import QueuedStorage  # noqa: E402

storage = QueuedStorage()

PAGE = """<!doctype html><title>Django + qproxy</title><h1>Django + qproxy</h1>
<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" multiple> <button>Upload</button></form>"""


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(PAGE)


@csrf_exempt  # an example; keep CSRF protection in a real app
def upload(request: HttpRequest) -> JsonResponse:
    keys = [storage.save(f"uploads/{f.name}", f) for f in request.FILES.getlist("file")]
    files = [{"key": k, "url": storage.url(k), "size": storage.size(k)} for k in keys]
    return JsonResponse({"keys": keys, "files": files}, status=201)


urlpatterns = [path("", index), path("upload", upload)]
app = get_wsgi_application()
