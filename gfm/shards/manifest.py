"""Scene manifests: many scenes, several sensors on one grid, and time series of one place, in one YAML file.

Format (paths relative to the manifest's folder)::

    sensors: my_sensors.yaml            # optional user sensor definitions
    defaults: {sensor: sentinel2_l2a}   # optional, applied to every file entry
    scenes:
      - id: landsat_scene
        sensor: landsat8
        date: 2015-08-04
        files: [l8_B1.tif, l8_B2.tif, l8_BQA.tif]
      - id: flood_chip                  # several sensors on one grid
        date: 2019-09-17
        files:
          - {path: S2Hand.tif, sensor: sentinel2_l1c}
          - {path: S1Hand.tif, sensor: sentinel1_grd, bands: [VV, VH]}
        label: LabelHand.tif
        label_ignore: -1
      - id: fields                      # vector labels, rasterised onto the scene grid
        files: [LT50350322008110PAC01_b3.tif, LT50350322008110PAC01_b4.tif]
        label: fields.gpkg
        label_field: crop
      - id: slovenia                    # a time series: one entry per date
        sensor: sentinel2_l1c
        crs: EPSG:32633                 # georeference for cubes without one
        bounds: [465181.05, 5079244.89, 466180.53, 5080254.63]
        observations:
          - {date: 2015-08-20, files: [{path: stack.npy, index: 0}]}
          - {date: 2015-07-31, files: [{path: stack.npy, index: 1}]}
      - id: pines
        files: [{path: pines.npy, wavelengths: wavelengths_nm.txt}]
        label: pines_gt.npy
        gsd: 20
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gfm.sensors import SensorError, load_sensors_yaml
from gfm.shards.errors import InputError
from gfm.shards.remote import is_remote
from gfm.shards.spec import DateSpec, FileSpec, SceneSpec

_SCENE_KEYS = {
    "id", "sensor", "date", "files", "observations", "label", "label_key", "label_class", "label_ignore",
    "label_field", "crs", "bounds", "gsd", "bands", "nodata",
}
_FILE_KEYS = {"path", "sensor", "bands", "nodata", "key", "index", "wavelengths", "fwhm"}


def _resolve(base: Path, p: str) -> str:
    if is_remote(p):  # a URL is read in place, never relative to the manifest
        return p
    path = Path(p)
    return str(path if path.is_absolute() else base / path)


def _file(base: Path, entry: Any, scene: dict[str, Any], where: str) -> FileSpec:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise InputError(f"{where}: a file entry must be a path or a mapping with 'path'")
    unknown = set(entry) - _FILE_KEYS
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_FILE_KEYS))}"
        )
    bands = entry.get("bands", scene.get("bands"))
    if isinstance(bands, str):
        bands = [b.strip() for b in bands.split(",")]
    return FileSpec(
        path=_resolve(base, str(entry["path"])),
        sensor=entry.get("sensor", scene.get("sensor")),
        bands=list(bands) if bands is not None else None,
        nodata=entry.get("nodata", scene.get("nodata")),
        cube_key=entry.get("key"),
        cube_index=entry.get("index"),
        wavelengths=_resolve(base, entry["wavelengths"]) if "wavelengths" in entry else None,
        fwhm=_resolve(base, entry["fwhm"]) if "fwhm" in entry else None,
    )


def load_manifest(path: str | Path) -> list[SceneSpec]:
    """Parse a manifest into scene specs.

    Raises:
        InputError: naming the manifest, the scene and the key that is wrong.
    """
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read manifest ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scenes"), list):
        raise InputError(f"{p}: expected a mapping with a 'scenes' list")
    base = p.parent
    if "sensors" in doc:
        try:
            load_sensors_yaml(_resolve(base, doc["sensors"]), replace=True)
        except SensorError as e:
            raise InputError(str(e)) from None
    defaults = doc.get("defaults") or {}
    specs = []
    for i, raw in enumerate(doc["scenes"]):
        where = f"{p}: scenes[{i}]"
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a mapping")
        scene = {**defaults, **raw}
        unknown = set(scene) - _SCENE_KEYS
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        sid = str(scene.get("id", f"scene{i}"))
        where = f"{p}: scene {sid!r}"
        if "observations" in scene:
            if "files" in scene:
                raise InputError(f"{where}: give either 'files' (one date) or 'observations' (a time series)")
            obs = scene["observations"]
            if not isinstance(obs, list) or not obs:
                raise InputError(f"{where}.observations: expected a non-empty list of {{date, files}}")
            dates = []
            for j, o in enumerate(obs):
                if not isinstance(o, dict) or "files" not in o:
                    raise InputError(f"{where}.observations[{j}]: expected a mapping with 'files' (and 'date')")
                files = [_file(base, f, scene, f"{where}.observations[{j}].files") for f in o["files"]]
                dates.append(DateSpec(str(o["date"]) if o.get("date") is not None else None, files))
        elif "files" in scene:
            files = [_file(base, f, scene, f"{where}.files") for f in scene["files"]]
            date = scene.get("date")
            dates = [DateSpec(str(date) if date is not None else None, files)]
        else:
            raise InputError(f"{where}: needs 'files' or 'observations'")
        specs.append(
            SceneSpec(
                id=sid,
                dates=dates,
                label=_resolve(base, scene["label"]) if scene.get("label") else None,
                label_key=scene.get("label_key"),
                label_class=scene.get("label_class"),
                crs=scene.get("crs"),
                bounds=[float(b) for b in scene["bounds"]] if scene.get("bounds") else None,
                gsd=float(scene["gsd"]) if scene.get("gsd") is not None else None,
                label_ignore=int(scene.get("label_ignore", -1)),
                label_field=str(scene["label_field"]) if scene.get("label_field") is not None else None,
            )
        )
    return specs
