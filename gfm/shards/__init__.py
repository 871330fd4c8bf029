"""The shard writer: any scene, any sensor → WebDataset shards with band metadata, validity and statistics.

Python API (the ``gfm shards`` command is a thin shell over it)::

    from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build, info, verify

    scene = SceneSpec("l8", [DateSpec("2015-08-04", [FileSpec(p, "landsat8") for p in band_files])])
    report = build([scene], BuildOptions(out="shards/l8", tile=64))   # -> BuildReport
    print(report.samples, report.index.stats["landsat8/B4"].mean)
    assert verify("shards/l8").ok                                      # -> VerifyReport
    print(info("shards/l8").text())                                    # -> DatasetInfo

* :func:`build` (``gfm shards build``): plan, write (resumably, in parallel, optionally one part of
  many), and merge ``index.json``; :func:`write_index` (``gfm shards index``) merges the finished
  shards of every part; :func:`verify` and :func:`info` check and summarise a dataset root.
* Scenes are described by :class:`SceneSpec` / :class:`DateSpec` / :class:`FileSpec`, directly, from
  a YAML manifest (:func:`load_manifest`), from STAC items (:func:`load_stac`), or grouped into dates
  by product file names (:func:`dates_from_names`). A file may be a URL GDAL reads in place
  (``https://``, ``s3://``, ``gs://``, ``/vsi...``; :mod:`gfm.shards.remote`): only the byte ranges
  under the tiles are fetched.
* Errors are :class:`ShardError` subclasses (:class:`InputError`, :class:`OptionError`,
  :class:`DatasetError`), one line naming the file or value and what was expected.
* The ``index.json`` contract itself lives in :mod:`gfm.index`; the tile schema in :mod:`gfm.schema`.

Modules, one concern each: ``spec`` (what to build), ``options``, ``errors``, ``grid`` (the pixel grid
of a scene), ``readers`` (aligned window reads of rasters and cubes), ``scene`` (opening a scene:
sensor and band recognition, quality layers, labels), ``plan`` (tiles → shards, ``build.json``),
``tiles`` (cutting tiles, validity), ``stats`` (mergeable band statistics), ``write`` (one shard: tar +
sidecar), ``sidecar`` (the per-shard summary), ``merge`` (sidecars → ``index.json``), ``holdout``
(held-out tiles kept off the training tiles' ground), ``build`` (the whole build), ``verify``,
``info``, ``manifest`` (YAML scene lists), ``stac`` (STAC items as scenes), ``remote`` (URLs: GDAL
paths, HTTP settings, fingerprints, redaction).
"""

from gfm.shards.build import BuildReport, build
from gfm.shards.errors import DatasetError, InputError, OptionError, ShardError
from gfm.shards.info import BandRow, DatasetInfo, info, info_text, plot_band_stats
from gfm.shards.manifest import load_manifest
from gfm.shards.merge import write_index
from gfm.shards.options import EDGES, RESAMPLING, SPLITS, BuildOptions
from gfm.shards.spec import DateSpec, FileSpec, SceneSpec, dates_from_names
from gfm.shards.stac import StacScenes, load_stac
from gfm.shards.verify import Problem, VerifyReport, iter_samples, verify

__all__ = [
    "EDGES",
    "RESAMPLING",
    "SPLITS",
    "BandRow",
    "BuildOptions",
    "BuildReport",
    "DatasetError",
    "DatasetInfo",
    "DateSpec",
    "FileSpec",
    "InputError",
    "OptionError",
    "Problem",
    "SceneSpec",
    "ShardError",
    "StacScenes",
    "VerifyReport",
    "build",
    "dates_from_names",
    "info",
    "info_text",
    "iter_samples",
    "load_manifest",
    "load_stac",
    "plot_band_stats",
    "verify",
    "write_index",
]
