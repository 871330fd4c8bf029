"""gfm: pretrain and adapt geospatial foundation models on any sensor."""

__version__ = "0.1.0"
