"""Settings for Django's file_storage tests (its app, as Django's runtests.py installs it)."""

import os
import tempfile

SECRET_KEY = "qproxy-tests-only"
INSTALLED_APPS = ["file_storage"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "file_storage.urls"
USE_TZ = True
MEDIA_ROOT = os.environ.get("QP_MEDIA_ROOT", tempfile.mkdtemp(prefix="qp-media-"))
# qproxy's settings come from the stack's QPROXY_* environment.
QPROXY: dict[str, str] = {}
# As Django's runtests.py sets them (LiveServerTestCase's handlers need both).
STATIC_URL = "static/"
MEDIA_URL = "media/"
