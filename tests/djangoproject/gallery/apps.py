from typing import Any

from django.apps import AppConfig


class GalleryConfig(AppConfig):
    name = "tests.djangoproject.gallery"
    label = "gallery"

    def ready(self) -> None:
        from qproxy.contrib.django import file_transferred

        file_transferred.connect(_mark_in_s3)


def _mark_in_s3(sender: Any, name: str, record: dict[str, Any], **kwargs: Any) -> None:
    # Runs in the worker (the signal is sent from its QPROXY_ON_TRANSFERRED hook).
    from tests.djangoproject.gallery.models import Photo

    Photo.objects.filter(image=name).update(image_in_s3=True)
