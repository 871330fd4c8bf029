"""Publish-and-use programs over :mod:`gfm.hub` and :mod:`gfm.infer`.

``gfm export`` (this package's ``__main__``) writes a Hugging Face directory; ``gfm embed``
(:mod:`export.embed`) writes tile embeddings as GeoParquet; ``gfm predict`` (:mod:`export.predict`) runs a
model over whole scenes into a Cloud-Optimized GeoTIFF. Each is a thin command line over a library call.
"""
