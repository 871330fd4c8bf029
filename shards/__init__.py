"""The shard-building program: any scene, any sensor → WebDataset shards (``gfm shards``)."""
