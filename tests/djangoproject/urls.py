from django.urls import path

from tests.djangoproject.gallery import views

urlpatterns = [
    path("", views.index),
    path("photos/new", views.create),
    path("photos/<int:pk>.json", views.detail),
    path("photos/<int:pk>/delete", views.delete),
]
