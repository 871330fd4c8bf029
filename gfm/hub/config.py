"""The ``config.json`` of an export: the model config, architecture, bands and statistics, inputs, training."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from gfm import __version__
from gfm.batch import Batch
from gfm.config import ConfigError, from_dict, to_dict
from gfm.hub.base import CONFIG_NAME, FORMAT, FORMAT_VERSION, HubError, weights_dtype
from gfm.hub.sources import WeightsSource
from gfm.sensors import KIND_CODE, SensorError, get_sensor


def model_config(values: Mapping[str, Any]) -> Any:
    """``values`` as a typed ``gfm.model.ModelConfig`` (unknown keys are named in the error)."""
    from gfm.model.registry import ModelConfig

    try:
        return from_dict(ModelConfig, dict(values), prefix="model")
    except ConfigError as e:
        raise HubError(f"model config: {e}") from None


def build_net(config: Mapping[str, Any]) -> nn.Module:
    """The module an exported ``config.json`` (or any mapping with a ``model`` section) describes.

    A merged fine-tuned export (``task.merged``) is the fine-tuning task model (``gfm.finetune``'s
    ``TaskModel``: the encoder its ``encoder_arch`` describes plus the task head); otherwise the model
    the ``model`` section's ``ModelConfig`` builds.
    """
    task = config.get("task")
    if task and task.get("merged"):
        from gfm.finetune.artifacts import task_model
        from gfm.finetune.weights import build_arch

        return task_model(dict(task), build_arch(task["encoder_arch"])).eval()
    net = model_config(config["model"]).build()
    net.eval()
    return net


def _scalars(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}


def describe_architecture(net: nn.Module) -> dict[str, Any]:
    """Class, parameter count and the scalar hyper-parameters a module and its encoder carry."""
    encoder = getattr(net, "encoder", net)
    out: dict[str, Any] = {
        "class": type(net).__name__,
        "parameters": sum(p.numel() for p in net.parameters()),
        "tensors": len(net.state_dict()),
        "hyperparameters": _scalars(net),
    }
    blocks = getattr(encoder, "blocks", None)
    enc: dict[str, Any] = {"class": type(encoder).__name__, **_scalars(encoder)}
    if blocks is not None:
        enc["depth"] = len(blocks)
    if encoder is not net:
        out["encoder"] = enc
        decoder_blocks = getattr(net, "decoder_blocks", None)
        if decoder_blocks is not None:
            out["hyperparameters"]["decoder_depth"] = len(decoder_blocks)
    else:
        out["hyperparameters"] = enc
    return out

# ------------------------------------------------------------------------------------------------
# Band table and statistics


def _sensor_facts(name: str) -> dict[str, Any]:
    try:
        s = get_sensor(name)
    except (SensorError, KeyError):
        return {}
    return {
        "description": s.description,
        "scale": s.scale,
        "offset": s.offset,
        "nodata": s.nodata,
        "gsd_m": {b.name: b.gsd_m for b in s.bands if b.gsd_m},
    }


def band_table(index: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(bands, sensors)`` for ``config.json`` from an ``index.json`` document.

    ``bands``: ``"sensor/band"`` → physical description (name, sensor, center_nm, fwhm_nm, kind), the
    sensor's native GSD, scale, offset and nodata when the sensor is registered, and the statistics
    (mean, std and whatever else the index holds). ``sensors``: name → description, scale, offset,
    nodata and the band keys seen.
    """
    stats = index.get("stats") or {}
    described = index.get("bands") or {}
    bands: dict[str, Any] = {}
    sensors: dict[str, Any] = {}
    for key in sorted(set(stats) | set(described)):
        desc = dict(described.get(key) or {})
        sensor, _, name = key.partition("/")
        facts = _sensor_facts(desc.get("sensor", sensor))
        entry = {
            "name": desc.get("name", name),
            "sensor": desc.get("sensor", sensor),
            "center_nm": desc.get("center_nm"),
            "fwhm_nm": desc.get("fwhm_nm"),
            "kind": desc.get("kind"),
            "gsd_m": facts.get("gsd_m", {}).get(desc.get("name", name)),
            "scale": facts.get("scale"),
            "offset": facts.get("offset"),
            "nodata": facts.get("nodata"),
            "stats": dict(stats.get(key) or {}),
        }
        bands[key] = entry
        s = sensors.setdefault(entry["sensor"], {
            "description": facts.get("description"), "scale": facts.get("scale"), "offset": facts.get("offset"),
            "nodata": facts.get("nodata"), "bands": [],
        })
        s["bands"].append(key)
    return bands, sensors


def with_task_bands(config: Mapping[str, Any], task_bands: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` with the band table a fine-tuning run normalised its data with (its ``finetune.json`` ``bands``).

    For every sensor the fine-tuning data held, the fine-tuning entries (description and ``stats``)
    replace the base model's: the task model was trained on inputs normalised with them, so new scenes
    must be too. Other sensors keep the base model's entries. ``normalization.task_bands`` lists the keys
    whose statistics come from the fine-tuning data. A manifest without ``bands`` (older runs) changes
    nothing.
    """
    out = dict(config)
    if not task_bands:
        return out
    sensors_seen = {str(e.get("sensor") or k.partition("/")[0]) for k, e in task_bands.items()}
    table = {k: dict(v) for k, v in (config.get("bands") or {}).items()
             if str(v.get("sensor") or k.partition("/")[0]) not in sensors_seen}
    sensors = {k: dict(v) for k, v in (config.get("sensors") or {}).items() if k not in sensors_seen}
    described = ("name", "sensor", "center_nm", "fwhm_nm", "kind")
    task_table, task_sensors = band_table({  # the manifest's table in the shape of an index document
        "stats": {k: dict(e.get("stats") or {}) for k, e in task_bands.items()},
        "bands": {k: {f: e[f] for f in described if e.get(f) is not None} for k, e in task_bands.items()},
    })
    table.update(task_table)
    sensors.update(task_sensors)
    out["bands"] = dict(sorted(table.items()))
    out["sensors"] = dict(sorted(sensors.items()))
    out["normalization"] = {**(config.get("normalization") or {}), "task_bands": sorted(task_bands)}
    return out


def stats_of(config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``"sensor/band"`` → ``{"mean", "std"}`` from an exported config (bands that have both)."""
    out = {}
    for key, b in (config.get("bands") or {}).items():
        st = b.get("stats") or {}
        if "mean" in st and "std" in st:
            out[key] = {"mean": float(st["mean"]), "std": float(st["std"])}
    return out


def read_index(path: str | Path) -> dict[str, Any]:
    """An ``index.json`` (a file or a dataset root) as a validated plain document (:mod:`gfm.index`)."""
    from gfm import index as index_contract

    try:
        return index_contract.read(path).to_dict()
    except index_contract.IndexFileError as e:
        raise HubError(str(e)) from None


def read_stats(path: str | Path) -> dict[str, dict[str, Any]]:
    """Statistics from an ``index.json``, an exported ``config.json`` or a plain ``{"sensor/band": {...}}`` file.

    Entries of an index or export carry their band's ``center_nm`` (and ``fwhm_nm``) too, so
    :func:`gfm.hub.input_bands` matches them by wavelength.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{p}: cannot read statistics ({e})") from None
    if not isinstance(doc, dict):
        raise HubError(f"{p}: expected a JSON object of statistics")
    if doc.get("format") == FORMAT:
        described = doc.get("bands") or {}
        return {k: {**st, **_wavelength_of(described.get(k))} for k, st in stats_of(doc).items()}
    table = doc.get("stats", doc)
    described = doc.get("bands") or {} if "stats" in doc else {}
    if not isinstance(table, dict) or not isinstance(described, dict):
        raise HubError(f"{p}: 'stats' and 'bands' must be JSON objects keyed '<sensor>/<band>'")
    out = {}
    for key, st in table.items():
        if not (isinstance(st, dict) and "/" in key and "mean" in st and "std" in st):
            raise HubError(f"{p}: entry {key!r} is not '<sensor>/<band>': {{'mean': .., 'std': ..}}")
        out[key] = {**dict(st), **_wavelength_of(described.get(key))}
    return out


def _wavelength_of(desc: Any) -> dict[str, Any]:
    """``center_nm``/``fwhm_nm`` of an index's or export's band description, when it has them."""
    if not isinstance(desc, dict):
        return {}
    return {k: float(desc[k]) for k in ("center_nm", "fwhm_nm") if isinstance(desc.get(k), (int, float))}


def _index_for_run(run_config: Mapping[str, Any], where: str) -> tuple[dict[str, Any] | None, str]:
    """The run's ``index.json`` document and where it was found (None and a reason for a run without shards).

    Raises:
        HubError: the run trained on shards whose index cannot be found (a moved or copied run; ``where``
            names it): an export without their statistics could normalise nothing.
    """
    data = run_config.get("data") or {}
    if data.get("source", "shards") != "shards":
        return None, f"data.source is {data.get('source')!r}"
    loader = data.get("loader") or {}
    spec, index = loader.get("shards"), loader.get("index")
    if not spec:
        return None, "data.loader.shards is empty"
    try:
        from gfm.data.sources import resolve_shards

        found = resolve_shards(str(spec), index)
    except Exception as e:  # LoaderError and friends
        raise HubError(f"{where}: the index.json of the shards it trained on cannot be found "
                       f"({str(e).splitlines()[0]}); pass index=INDEX.json (those shards' index, or one of data "
                       "from the same sensors) for the band statistics") from None
    return dict(found.index.raw), str(found.index.url)

# ------------------------------------------------------------------------------------------------
# config.json

#: the top-level keys of an exported ``config.json`` (what :func:`hub_config` and :func:`gfm.hub.export` write)
CONFIG_KEYS = frozenset({"format", "format_version", "gfm_version", "model", "architecture", "task", "bands",
                         "sensors", "normalization", "inputs", "training", "evaluation", "license", "weights_dtype"})


def portable(doc: Any) -> Any:
    """``doc`` (plain JSON data) with every absolute local path replaced by its last component.

    What an export writes is published (``--push``): the directories of the machine it was made on say
    nothing useful to a reader and may say too much (user names, project layout). Relative paths, URLs
    and other strings are kept.
    """
    if isinstance(doc, dict):
        return {k: portable(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [portable(v) for v in doc]
    if isinstance(doc, str) and "\n" not in doc and (doc.startswith(("/", "~", "file://"))
                                                      or (len(doc) > 2 and doc[1:3] in (":\\", ":/"))):
        return Path(doc.removeprefix("file://").replace("\\", "/").rstrip("/")).name or doc
    return doc


def validate_config(config: Any, where: str = CONFIG_NAME) -> dict[str, Any]:
    """``config`` if it is an exported ``config.json`` this gfm can read; else a :class:`HubError` naming the key.

    Checks the format and its version (a newer one is refused, not guessed at), that every top-level key
    is one an export writes, that ``model`` is a mapping, that ``weights_dtype`` is known, and that every
    band's statistics are finite with a positive ``std`` (a NaN or zero there would silently turn a
    band's inputs into NaN or infinity).
    """
    if not isinstance(config, dict):
        raise HubError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise HubError(f"{where}: 'format' is {config.get('format')!r}, expected {FORMAT!r} (not a gfm export)")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise HubError(f"{where}: format_version {version!r}; this gfm ({__version__}) reads 1 to {FORMAT_VERSION} "
                       "(a newer one needs a newer gfm)")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise HubError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; an export has "
                       f"{', '.join(sorted(CONFIG_KEYS))}")
    if not isinstance(config.get("model"), dict):
        raise HubError(f"{where}: 'model' must be a mapping of ModelConfig fields")
    weights_dtype(str(config.get("weights_dtype") or "float32"))
    bands = config.get("bands") or {}
    if not isinstance(bands, dict):
        raise HubError(f"{where}: 'bands' must map '<sensor>/<band>' to band descriptions")
    for key, band in bands.items():
        st = (band or {}).get("stats") if isinstance(band, dict) else None
        if not isinstance(band, dict) or not isinstance(st, dict):
            raise HubError(f"{where}: bands[{key!r}] must be a mapping with a 'stats' mapping")
        for name in ("mean", "std"):
            if name not in st:
                continue
            value = st[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HubError(f"{where}: bands[{key!r}].stats.{name} is {value!r}, expected a finite number")
        if "std" in st and st["std"] <= 0:
            raise HubError(f"{where}: bands[{key!r}].stats.std is {st['std']!r}, expected a positive number")
    return config


#: What each Batch field means for a user feeding the model, and the value to pass when it is unknown.
INPUTS: dict[str, dict[str, Any]] = {
    "pixels": {"shape": "[B, C, H, W] float32", "meaning": "(raw - mean) / std per observation, with the "
               "statistics of 'bands'; pixels marked invalid may hold anything", "unknown": None},
    "wavelength": {"shape": "[B, C] float32", "meaning": "centre wavelength in nm (radar wavelength for SAR)",
                   "unknown": "required"},
    "bandwidth": {"shape": "[B, C] float32", "meaning": "band FWHM in nm", "unknown": 10.0},
    "kind": {"shape": "[B, C] int64", "meaning": "observation kind code", "codes": KIND_CODE,
             "unknown": KIND_CODE["reflectance"]},
    "time": {"shape": "[B, C] float32", "meaning": "acquisition date, days since 1970-01-01",
             "unknown": "NaN"},
    "valid": {"shape": "[B, C, H, W] bool", "meaning": "True = usable pixel (not nodata, cloud or fill)",
              "unknown": "all True"},
    "gsd": {"shape": "[B] float32", "meaning": "ground sampling distance in metres", "unknown": "NaN"},
    "lonlat": {"shape": "[B, 2] float32", "meaning": "tile centre (longitude, latitude), WGS84 degrees",
               "unknown": "NaN or omit"},
    "sensor": {"shape": "[B, C] int64", "meaning": "sensor id: gfm.batch.sensor_code(name)", "unknown": "omit"},
}


def inputs_section(net: nn.Module, tile_size: int | None) -> dict[str, Any]:
    """The ``inputs`` part of ``config.json``: fields of :class:`gfm.batch.Batch` the model reads."""
    encoder = getattr(net, "encoder", net)
    names = [f.name for f in fields(Batch) if f.name not in ("label", "keys")]
    return {
        "fields": {n: INPUTS.get(n, {"meaning": "see gfm.batch.Batch", "unknown": "omit"}) for n in names},
        "patch_size": getattr(encoder, "patch_size", None),
        "spectral_patch": getattr(encoder, "spectral_patch", None),
        "tile_size_trained": tile_size,
        "any_band_set": "any number and order of observations; each carries its own wavelength, bandwidth, "
                        "kind and date, so unseen bands embed from their physical description",
        "helper": "gfm.hub.prepare(pixels, bands, stats) or model.prepare(...) builds this from raw values",
    }


def _metrics_tail(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            last = json.loads(line)
    return {k: last[k] for k in ("step", "loss", "loss_pos", "loss_obs", "lr") if k in last}


def training_summary(source: WeightsSource, index: Mapping[str, Any] | None, index_url: str) -> dict[str, Any]:
    """Where the weights came from, how long and how they were trained, on which data."""
    rc = source.run_config
    engine = rc.get("engine") or {}
    meta = source.meta
    step = source.step if source.step is not None else meta.get("step")
    effective = meta.get("effective_batch")
    data = rc.get("data") or {}
    summary: dict[str, Any] = {
        "source": {"kind": source.kind, "path": str(source.path), "weights": str(source.weights)},
        "step": step,
        "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage", engine.get("zero_stage")),
        "precision": meta.get("precision", engine.get("precision")),
        "effective_batch": effective,
        "samples_seen": step * effective if step is not None and effective else None,
        "final_metrics": _metrics_tail(source.run_dir),
        "data": {"source": data.get("source"), "shards": (data.get("loader") or {}).get("shards")},
        "config": rc,
    }
    if index is not None:
        summary["data"].update({
            "index": index_url,
            "samples": index.get("samples"),
            "shards": len(index.get("shards") or []),
            "sensors": index.get("sensors"),
            "dates": [index["dates"][0], index["dates"][-1]] if index.get("dates") else [],
            "tile_size": index.get("tile_size"),
        })
    return summary


def hub_config(
    source: WeightsSource,
    net: nn.Module,
    index: Mapping[str, Any] | None,
    index_url: str = "",
    task: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of an export (plain JSON data; :func:`build_net` rebuilds the model from it)."""
    bands, sensors = band_table(index or {})
    tile = (index or {}).get("tile_size")
    crop = ((source.run_config.get("data") or {}).get("loader") or {}).get("crop_size")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gfm_version": __version__,
        "model": to_dict(model_config(source.model_config)),
        "architecture": describe_architecture(net),
        "task": dict(task) if task else None,
        "bands": bands,
        "sensors": sensors,
        "normalization": {
            "formula": "x = (raw - mean) / std per observation, statistics keyed '<sensor>/<band>' in 'bands'",
            "raw": "the stored pixel values (digital numbers), before the sensor's scale/offset",
            "invalid": "nodata, NaN and masked pixels are set to 0 and marked False in 'valid'",
            "std_zero": "a std <= 0 is replaced by 1",
            "source": index_url or None,
        },
        "inputs": inputs_section(net, crop or tile),
        "training": training_summary(source, index, index_url),
        "evaluation": dict(evaluation) if evaluation else None,
    }
