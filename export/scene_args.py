"""Command-line options shared by ``gfm predict`` and ``gfm embed``: how files make a scene, statistics, outputs."""

from __future__ import annotations

import argparse
from typing import Any

from gfm.hub import HubError, OutputExistsError, UnknownBandsError
from gfm.shards import ShardError


def _flag(option: str, value: Any) -> str:
    flag = "--key" if option == "cube_key" else f"--{option.replace('_', '-')}"
    return flag if value is None else f"{flag} {value}"


def add_scene_arguments(p: argparse.ArgumentParser) -> None:
    """The scene options of ``gfm shards build`` that apply to one scene."""
    g = p.add_argument_group("scene (as in 'gfm shards build')")
    g.add_argument("--sensor", help="sensor preset (see 'gfm sensors'); guessed from product file names if omitted")
    g.add_argument("--sensors-yaml", help="YAML file of user sensor definitions to register first")
    g.add_argument("--bands", help="band names across the files in file/band order, comma separated")
    g.add_argument("--date", help="acquisition date YYYY-MM-DD (default: from the file names)")
    g.add_argument("--nodata", type=float, help="nodata value overriding the files' own")
    g.add_argument("--wavelengths", help="wavelength list (nm) for a hyperspectral cube")
    g.add_argument("--fwhm", help="band width list (nm) for a hyperspectral cube")
    g.add_argument("--key", help="variable name in a .mat cube")
    g.add_argument("--gsd", type=float, help="target ground sampling distance in metres (default: the finest band)")
    g.add_argument("--scene-id", help="scene id (default: from the first file name)")
    g.add_argument("--resampling", default="bilinear",
                   choices=["nearest", "bilinear", "cubic", "average", "lanczos", "mode"],
                   help="resampling for bands not on the scene grid (default bilinear)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--stats``, ``--drop-unknown-bands``, ``--overwrite``, ``--batch-size``, ``--no-progress``."""
    p.add_argument("--model", required=True,
                   help="exported model directory (gfm export), the short name of a model shipped with gfm (gfm "
                        "models; an existing path wins) or a Hub id org/name[@revision] (fetched into the Hugging "
                        "Face cache)")
    p.add_argument("--stats", metavar="JSON",
                   help="band statistics for bands the model has none for: an index.json (e.g. of shards built "
                        "from this sensor), an exported config.json, or {\"sensor/band\": {\"mean\": m, \"std\": s}}")
    p.add_argument("--drop-unknown-bands", action="store_true",
                   help="leave out bands the model has no statistics for (the model accepts any band set)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")


def open_scene_from(a: argparse.Namespace) -> Any:
    """The scene the files and options describe, opened as ``gfm shards build`` would."""
    from gfm.infer.scenes import SceneFiles, scene_spec
    from gfm.sensors import load_sensors_yaml
    from gfm.shards.scene import open_scene

    if a.sensors_yaml:
        load_sensors_yaml(a.sensors_yaml, replace=True)
    files = SceneFiles(
        files=a.files, sensor=a.sensor, bands=[b.strip() for b in a.bands.split(",")] if a.bands else None,
        date=a.date, nodata=a.nodata, wavelengths=a.wavelengths, fwhm=a.fwhm, cube_key=a.key, gsd=a.gsd,
        scene_id=a.scene_id,
    )
    return open_scene(scene_spec(files), resampling=a.resampling)


def stats_from(a: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    """``--stats`` as ``{"sensor/band": {"mean", "std"}}`` (with ``center_nm``/``fwhm_nm`` where the file has them)."""
    if not a.stats:
        return None
    from gfm.infer.api import stats_table

    return stats_table(a.stats)


def explain(prog: str, e: Exception) -> str:
    """One line for a library error, phrased with this program's options."""
    if isinstance(e, OutputExistsError):
        return f"{prog}: {e.path}: already exists (pass --overwrite to replace it)"
    if isinstance(e, UnknownBandsError):
        shown = ", ".join(e.known[:8]) + (" ..." if len(e.known) > 8 else "")
        return (f"{prog}: {e.where}band(s) {', '.join(e.bands)} have no normalisation statistics in the model (it has: "
                f"{shown or 'none'}); pass --stats INDEX.json with statistics for them (e.g. the index.json of "
                "shards built from this sensor), or --drop-unknown-bands to leave them out")
    if isinstance(e, ShardError):
        return f"{prog}: " + e.render(_flag)
    from gfm.infer.predictors import BandSetError

    if isinstance(e, BandSetError):
        return f"{prog}: " + e.render("choose those bands with --bands (and the files that hold them), or leave bands "
                                      "without statistics out with --drop-unknown-bands (not --stats for them)")
    if isinstance(e, HubError):
        return f"{prog}: {e}".replace("adapter=DIR", "--adapter DIR").replace("overwrite=True", "--overwrite")
    return f"{prog}: {e}"
