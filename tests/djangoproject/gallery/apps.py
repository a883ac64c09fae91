from django.apps import AppConfig


class GalleryConfig(AppConfig):
    name = "tests.djangoproject.gallery"
    label = "gallery"
