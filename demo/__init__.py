"""The ``gfm demo`` program: shards -> info/verify -> pretraining, on a dataset a PyPI package ships."""
