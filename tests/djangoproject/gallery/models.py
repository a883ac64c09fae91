from django.db import models

from qproxy.contrib.django import QueuedStorage


class Photo(models.Model):
    title = models.CharField(max_length=100)
    image = models.ImageField(
        storage=QueuedStorage(), upload_to="photos/", width_field="width", height_field="height"
    )
    width = models.PositiveIntegerField(null=True)
    height = models.PositiveIntegerField(null=True)
    attachment = models.FileField(
        storage=QueuedStorage(delayed=True), upload_to="docs/", blank=True
    )
    # Set by the QPROXY_ON_TRANSFERRED hook in the worker, without polling.
    image_in_s3 = models.BooleanField(default=False)
