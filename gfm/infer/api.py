"""``gfm.predict``: a fine-tuned model over a scene (files, URLs or an array) → a class map, in Python.

What ``gfm predict`` does, as one call (the command line is a thin shell over :func:`predict`)::

    import gfm

    pred = gfm.predict("exported/pines_merged", cube, wavelengths=wl, sensor="aviris", gsd=20)
    pred.classes                 # [H, W] uint8, 255 = nodata; pred.report.classes names the indices
    gfm.predict("exported/l8_seg", ["LC08_..._B2.TIF", "LC08_..._B3.TIF", "LC08_..._B4.TIF"],
                out="pred.tif")  # a COG, written block by block as gfm predict writes it

The scene is either what ``gfm predict`` reads (raster files or URLs GDAL reads, or one ``.npy``/``.mat``
cube with a wavelength list file), opened as ``gfm shards build`` opens it (:func:`gfm.infer.scenes.scene_spec`,
:func:`gfm.shards.scene.open_scene`); or a numpy array ``[bands, H, W]`` described by its wavelengths (a
hyperspectral cube, as a ``.npy`` with ``--wavelengths``) or by a registered sensor and its band names. An
array becomes the same :class:`~gfm.shards.scene.Scene` a ``.npy`` cube file does, in memory: one
:class:`~gfm.shards.readers.CubeReader` on the array's own grid (image coordinates, or ``transform`` and
``crs``), so the two predict the same classes pixel for pixel.

With ``out`` the class map is written as a Cloud-Optimized GeoTIFF with memory flat in the scene's size
(:func:`gfm.infer.predict.predict_scene`); without it the classes (and, if asked, float probabilities) come
back as arrays held in memory (:func:`gfm.infer.predict.predict_array`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine

from gfm.hub import input_bands, read_stats
from gfm.infer.predict import Prediction, PredictOptions, predict_array, predict_scene
from gfm.infer.predictors import LoadedTask, load_task_model, make_predictor
from gfm.infer.scenes import SceneFiles, observation_bands, scene_spec
from gfm.outputs import check_files
from gfm.sensors import SensorError, get_sensor, hyperspectral, load_sensors_yaml, read_wavelengths
from gfm.shards import DateSpec, InputError, SceneSpec
from gfm.shards.grid import Grid
from gfm.shards.readers import CubeReader
from gfm.shards.scene import Scene, open_scene
from gfm.shards.spec import check_specs

_logger = logging.getLogger("gfm.infer")

#: the reader's name for an array scene (in messages and the scene's file list)
ARRAY_SOURCE = "<array>"
#: a model's training tile when its export does not record one
DEFAULT_TILE = 64

SceneInput = str | Path | Sequence[str | Path] | np.ndarray
"""A scene: a raster path or URL, several (one scene), one ``.npy``/``.mat`` cube, or an array ``[bands, H, W]``."""


def predict(
    model: str | Path | LoadedTask,
    scene: SceneInput,
    *,
    out: str | Path | None = None,
    probabilities: bool | str | Path | None = False,
    adapter: str | Path | None = None,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    wavelengths: Sequence[float] | np.ndarray | str | Path | None = None,
    bandwidths: Sequence[float] | np.ndarray | str | Path | None = None,
    date: str | None = None,
    gsd: float | None = None,
    nodata: float | None = None,
    transform: Affine | None = None,
    crs: str | CRS | None = None,
    cube_key: str | None = None,
    scene_id: str | None = None,
    resampling: str = "bilinear",
    sensors_yaml: str | Path | None = None,
    stats: str | Path | Mapping[str, Mapping[str, float]] | None = None,
    unknown: Literal["error", "drop"] = "error",
    tile: int | None = None,
    overlap: int | None = None,
    block: int = 512,
    region: tuple[int, int, int, int] | None = None,
    batch_size: int = 8,
    pixel_batch: int = 512,
    window_batch: int = 256,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Prediction:
    """Predict a class for every pixel of a scene with a fine-tuned (segmentation or pixel) model.

    Args:
        model: what ``gfm predict --model`` takes: an export directory (``gfm export``), a shipped model's
            short name, a Hub id ``org/name[@revision]``; or a model already loaded with
            :func:`gfm.infer.load_task_model` (to predict several scenes with one load; moved to ``device``).
        scene: raster files or URLs (one path or a list: the files of one scene, as ``gfm predict`` takes
            them), one ``.npy``/``.mat`` cube file, or a numpy array ``[bands, H, W]`` (band axis first, as
            rasterio reads; ``[H, W, bands]`` is refused: ``np.moveaxis(a, -1, 0)`` makes it). An array is
            described by ``wavelengths`` (and ``bandwidths``), or by ``sensor`` and ``bands``.
        out: write the class map to this Cloud-Optimized GeoTIFF (memory flat in the scene's size);
            None: return it as an array, holding the whole result in memory.
        probabilities: with ``out``, a path for the class probabilities COG (uint8, ``p × 254``, 255 =
            nodata), or None/False; without ``out``, True to return them as float32 ``[K, H, W]``.
        adapter: a fine-tuning run directory (or an export's ``adapter/``) to apply to ``model``.
        sensor: the sensor preset (guessed from product file names if omitted); for a hyperspectral array,
            the name its bands are given (default ``hyperspectral``).
        bands: band names across the files in file/band order, or of the array's bands (with ``sensor``).
        wavelengths: centre wavelengths (nm), one per band: numbers for an array, or a list file (a
            cube file's, as ``--wavelengths``).
        bandwidths: band widths (FWHM, nm), likewise; default: the band spacing.
        date: acquisition date ``YYYY-MM-DD`` (files: default from their names).
        gsd: ground sampling distance in metres (files: the target grid's; an array without ``transform``:
            its pixel size).
        nodata: nodata value (overrides the files' own; marks invalid array pixels; NaN always is).
        transform: an array's affine transform (``rasterio.transform.Affine``), to georeference the output.
        crs: an array's CRS (with ``transform``).
        cube_key: the variable of a ``.mat`` cube.
        scene_id: the scene's id (default: from the first file name; ``array`` for an array).
        resampling: resampling of bands not on the scene grid (files).
        sensors_yaml: a YAML file of user sensor definitions to register first (replacing same names).
        stats: statistics for bands the model has none for: an ``index.json``, an exported ``config.json`` or
            ``{"sensor/band": {"mean": m, "std": s}}`` (a path or the mapping).
        unknown: ``"error"`` refuses bands without statistics (naming them), ``"drop"`` leaves them out
            (as :func:`gfm.hub.input_bands`).
        tile: tile side in pixels (default: the model's training tile, else 64).
        overlap: pixels shared by neighbouring tiles (default: tile/4; 0 for pixel-task models).
        block: output block side in pixels.
        region: predict only this window ``(row, col, height, width)`` of the scene grid.
        batch_size: tiles per forward.
        device: torch device for the model.
        pixel_batch: per-pixel models: pixels per forward.
        window_batch: pixel models that see the whole window: windows per forward.
        overwrite: replace existing output files (never an input).
        progress: show a progress bar.
        log: called with each notice (bands left out, files resampled); default: the ``gfm.infer`` logger.

    Returns:
        A :class:`~gfm.infer.predict.Prediction`: without ``out``, ``classes`` ``[H, W]`` (``uint8``, 255 =
        nodata, as in the COG; ``uint16``/65535 beyond 254 classes) and ``probabilities`` if asked; with
        ``out``, ``report.out`` (and ``report.probabilities``) written. ``report.classes`` names the class
        indices. With ``region``, H and W are the region's.

    Raises:
        HubError: the model (missing, no task head, an adapter that does not fit; the subclasses
            :class:`~gfm.hub.UnknownBandsError` and :class:`~gfm.infer.predictors.BandSetError` for bands).
        InputError: the scene (files, bands, sensor, wavelengths, the array's shape or type).
        OutputError: an output that is an input, given twice, or exists without ``overwrite``.
        TypeError: a scene that is neither paths nor a numpy array (e.g. a torch tensor: pass ``t.numpy()``).
        ValueError: arguments that do not go together (``probabilities`` of the wrong kind for ``out``, an
            adapter with an already loaded model).
    """
    array = isinstance(scene, np.ndarray)
    if out is None and probabilities not in (None, True, False):
        raise ValueError(f"probabilities={probabilities!r}: a path needs out= (the class map's path); without "
                         "out, pass probabilities=True to get them as an array")
    if out is not None and probabilities is True:
        raise ValueError("probabilities=True with out=: give the probabilities' path instead (a COG beside out)")
    if not array and any(v is not None and not isinstance(v, str | Path) for v in (wavelengths, bandwidths)):
        raise ValueError("wavelengths/bandwidths as numbers describe an array scene; for a cube file give their "
                         "list files (or np.load the cube and pass the array)")
    files = [] if array else list([scene] if isinstance(scene, str | Path) else scene)  # type: ignore[arg-type]
    if not all(isinstance(f, str | Path) for f in files):
        raise TypeError(f"scene: expected a path or URL, a list of them, or a numpy array [bands, H, W]; got "
                        f"{type(scene).__name__}")
    files = [str(f) for f in files]
    lists = [w for w in (wavelengths, bandwidths) if isinstance(w, str | Path)]
    prob_path = probabilities if isinstance(probabilities, str | Path) else None
    if out is not None:  # outputs first: a refused path costs no model load
        sources = [*files, *lists, stats if isinstance(stats, str | Path) else None]
        if not isinstance(model, LoadedTask):
            sources += [model, adapter]
        check_files({"out": out, "probabilities": prob_path}, sources)
    # an array is checked before the model loads (a load can take seconds, a Hub fetch minutes); files are
    # opened after it, as gfm predict always has
    opened: Scene | None = None
    if isinstance(scene, np.ndarray):
        if sensors_yaml:
            load_sensors_yaml(sensors_yaml, replace=True)
        opened = array_scene(scene, wavelengths=wavelengths, bandwidths=bandwidths, sensor=sensor, bands=bands,
                             date=date, gsd=gsd, nodata=nodata, transform=transform, crs=crs, scene_id=scene_id)
    if isinstance(model, LoadedTask):
        if adapter is not None:
            raise ValueError(f"adapter={adapter!r}: the model is already loaded; apply the adapter when loading it "
                             "(load_task_model(model, adapter))")
        loaded = model
    else:
        loaded = load_task_model(model, adapter)
    loaded.model.to(device)
    predictor = make_predictor(loaded.model, loaded.info, window_batch, pixel_batch)
    if opened is None:
        if sensors_yaml:
            load_sensors_yaml(sensors_yaml, replace=True)
        spec = scene_spec(SceneFiles(
            files=files, sensor=sensor, bands=list(bands) if bands is not None else None, date=date, nodata=nodata,
            wavelengths=str(wavelengths) if wavelengths is not None else None,
            fwhm=str(bandwidths) if bandwidths is not None else None, cube_key=cube_key, gsd=gsd, scene_id=scene_id,
        ))
        opened = open_scene(spec, resampling=resampling)
    config = loaded.config  # the export's statistics and band table
    matched = input_bands(observation_bands(opened), config, stats_table(stats), unknown,
                          where=f"scene {opened.spec.id}: ")
    emit = log or _logger.info
    for notice in opened.notices:  # once the scene is accepted: an error stays one line
        emit(notice)
    if matched.dropped:
        emit(f"notice: leaving out band(s) without statistics: {', '.join(matched.dropped)}")
    opts = PredictOptions(
        tile=tile or int((config.get("inputs") or {}).get("tile_size_trained") or DEFAULT_TILE), overlap=overlap,
        batch_size=batch_size, block=block, probabilities=prob_path, region=region, overwrite=overwrite,
        progress=progress, device=device,
    )
    if out is None:
        return predict_array(opened, predictor, matched, opts, probabilities=bool(probabilities))
    return Prediction(None, None, predict_scene(opened, predictor, matched, out, opts))


def array_scene(
    cube: np.ndarray,
    *,
    wavelengths: Sequence[float] | np.ndarray | str | Path | None = None,
    bandwidths: Sequence[float] | np.ndarray | str | Path | None = None,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    date: str | None = None,
    gsd: float | None = None,
    nodata: float | None = None,
    transform: Affine | None = None,
    crs: str | CRS | None = None,
    scene_id: str | None = None,
) -> Scene:
    """The scene of an array ``[bands, H, W]``: what ``open_scene`` makes of the same cube saved as ``.npy``.

    Bands come from ``wavelengths`` (a generic hyperspectral sensor named ``sensor``, bands ``B001``..) or
    from a registered ``sensor`` and its ``bands`` (default: all of its bands, in order). The grid is
    ``transform`` (in ``crs``, or image coordinates without it), else image coordinates at ``gsd`` (1 by
    default) with the origin at the bottom-left corner, as a cube file's.

    Raises:
        InputError: a shape other than ``[bands, H, W]`` (or an empty one), a non-numeric array, a band
            description whose count is not the array's band count, an unknown sensor or band, ``crs``
            without ``transform``.
    """
    if cube.ndim != 3:
        raise InputError(f"array of shape {cube.shape}: expected [bands, H, W] (3 axes, the band axis first)")
    if min(cube.shape) < 1:
        raise InputError(f"array of shape {cube.shape}: empty (each axis of [bands, H, W] needs a length of 1 or more)")
    if cube.dtype.kind not in "uif":
        raise InputError(f"array of dtype {cube.dtype}: expected numbers (unsigned, signed integers or floats)")
    n, height, width = cube.shape
    if wavelengths is not None:
        try:
            wl = _numbers(wavelengths)
            fw = _numbers(bandwidths) if bandwidths is not None else None
            if fw is not None and len(fw) != len(wl):
                raise InputError(f"bandwidths: {len(fw)} values for {len(wl)} wavelengths")
            band_list = list(hyperspectral(sensor or "hyperspectral", wl, fw, gsd_m=gsd or 0.0).bands)
        except SensorError as e:
            raise InputError(str(e)) from None
        described = f"wavelengths: {len(wl)} values"
    elif sensor is not None:
        try:
            known = get_sensor(sensor)
            band_list = [known.band(b) for b in (bands or known.band_names)]
        except SensorError as e:
            raise InputError(str(e)) from None
        described = f"{len(band_list)} {sensor} band(s) ({', '.join(b.name for b in band_list)})"
    else:
        raise InputError(f"array of shape {cube.shape}: describe its bands with wavelengths= (nm, one per band), or "
                         "sensor= with bands=")
    if len(band_list) != n:
        hint = ("; it looks like [H, W, bands]: pass np.moveaxis(array, -1, 0)"
                if cube.shape[-1] == len(band_list) else "")
        raise InputError(f"{described}, but the array of shape {cube.shape} has {n} bands on axis 0 "
                         f"([bands, H, W]){hint}")
    if crs is not None and transform is None:
        raise InputError(f"crs={str(crs)!r} given without transform= (the array's affine transform)")
    if transform is not None:
        grid = Grid(CRS.from_user_input(crs) if crs is not None else None, Affine(*tuple(transform)[:6]), width, height)
    else:
        step = gsd or 1.0
        grid = Grid(None, Affine(step, 0, 0, 0, -step, height * step), width, height)
    spec = SceneSpec(id=scene_id or "array", dates=[DateSpec(date, [])], gsd=gsd,
                     crs=str(crs) if crs is not None else None)
    check_specs([spec])  # a date that is not YYYY-MM-DD
    hwc = np.moveaxis(cube, 0, -1)  # the reader's layout, a view
    reader = CubeReader(ARRAY_SOURCE, hwc, band_list, nodata=nodata)
    return Scene(spec, grid, [(reader, date)], [], None, None, [])


def _numbers(values: Sequence[float] | np.ndarray | str | Path) -> list[float]:
    """A wavelength (or band width) list: numbers, or a list file (:func:`gfm.sensors.read_wavelengths`)."""
    if isinstance(values, str | Path):
        return read_wavelengths(values)
    return [float(v) for v in values]


def stats_table(stats: str | Path | Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, float]] | None:
    """``stats`` (an ``index.json``/statistics file, or its mapping) as ``{"sensor/band": {"mean", "std"}}``.

    ``center_nm``/``fwhm_nm`` are kept where given. ``gfm predict`` and ``gfm embed`` read ``--stats`` so.
    """
    if stats is None:
        return None
    doc = read_stats(stats) if isinstance(stats, str | Path) else stats
    keep = ("mean", "std", "center_nm", "fwhm_nm")
    return {k: {f: float(v[f]) for f in keep if v.get(f) is not None} for k, v in doc.items()}

