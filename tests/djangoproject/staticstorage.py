"""QueuedStorage as a staticfiles storage, hashed names and a manifest on top."""

from django.contrib.staticfiles.storage import ManifestFilesMixin

from qproxy.contrib.django import QueuedStorage


class QueuedManifestStorage(ManifestFilesMixin, QueuedStorage):
    pass
