from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt

from tests.djangoproject.gallery.forms import PhotoForm
from tests.djangoproject.gallery.models import Photo


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse("gallery")


def create(request: HttpRequest) -> HttpResponse:
    form = PhotoForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        photo = form.save()
        return redirect(f"/photos/{photo.pk}.json")
    return render(
        request,
        "gallery/form.html",
        {"form": form},
        status=400 if request.method == "POST" else 200,
    )


def detail(request: HttpRequest, pk: int) -> HttpResponse:
    photo = get_object_or_404(Photo, pk=pk)
    storage = photo.image.storage
    out = {
        "title": photo.title,
        "image": photo.image.name,
        "image_url": photo.image.url,
        "width": photo.width,
        "height": photo.height,
        "image_local": storage.using_local(photo.image.name),  # type: ignore[attr-defined]
        "image_remote": storage.using_remote(photo.image.name),  # type: ignore[attr-defined]
        "image_in_s3": photo.image_in_s3,
        "attachment": photo.attachment.name or None,
    }
    if photo.attachment:
        out["attachment_url"] = photo.attachment.url
        with photo.attachment.open("rb") as fh:
            out["attachment_text"] = fh.read().decode()
    return JsonResponse(out)


@csrf_exempt
def delete(request: HttpRequest, pk: int) -> HttpResponse:
    photo = get_object_or_404(Photo, pk=pk)
    photo.image.delete(save=False)
    if photo.attachment:
        photo.attachment.delete(save=False)
    photo.delete()
    return HttpResponse(status=204)
