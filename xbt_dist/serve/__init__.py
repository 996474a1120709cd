"""`xbt serve`: the upgraded query encoder behind HTTP: search the old-gallery index with a text or
an image (service.py), the FastAPI app (app.py), the side-by-side web page (page.py) and the
gallery thumbnails it shows (gallery.py).
"""
