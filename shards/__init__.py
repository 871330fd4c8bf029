"""The shard-building program (``gfm shards``, ``gfm sensors``): a command line over :mod:`gfm.shards`."""
