"""QPROXY_ON_TRANSFERRED: runs in the Celery worker with the whole record."""

from typing import Any

import django


def on_transferred(record: dict[str, Any]) -> None:
    django.setup()
    from tests.djangoproject.gallery.models import Photo

    Photo.objects.filter(image=record["key"]).update(image_in_s3=True)
