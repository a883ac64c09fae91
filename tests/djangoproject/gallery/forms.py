from django import forms

from tests.djangoproject.gallery.models import Photo


class PhotoForm(forms.ModelForm):
    class Meta:
        model = Photo
        fields = ("title", "image", "attachment")
