"""The generated model card (``README.md``) of an export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

#: the Hub's pipeline tag of each fine-tuning task (a pretraining export extracts features)
PIPELINE_TAGS = {"segmentation": "image-segmentation", "pixel": "image-segmentation",
                 "scene": "image-classification", "multilabel": "image-classification"}
#: test figures reported as Hub evaluation results: gfm's name → (metric type, readable name)
HUB_METRICS = {"oa": ("accuracy", "overall accuracy"), "aa": ("accuracy", "average accuracy"),
               "kappa": ("cohen_kappa", "Cohen's kappa"), "macro_f1": ("f1", "macro F1"),
               "micro_f1": ("f1", "micro F1"), "miou": ("mean_iou", "mean IoU")}


def card_metadata(config: Mapping[str, Any], license: str = "other") -> ModelCardData:
    """The card's YAML metadata (validated by huggingface_hub's ``ModelCardData``).

    Library, licence, tags, the pipeline tag of the task, the base model of a fine-tune whose base came
    from the Hub, the fine-tuning dataset, and its test figures as evaluation results (``model-index``).
    """
    task = config.get("task") or {}
    sensors = sorted(config.get("sensors") or {})
    name = (config.get("model") or {}).get("name", "gfm model")
    pipeline = PIPELINE_TAGS.get(str(task.get("task")), "image-segmentation") if task else "image-feature-extraction"
    evaluation = config.get("evaluation") or {}
    dataset = evaluation.get("dataset")
    results = [
        EvalResult(task_type=pipeline, dataset_type=dataset or "custom", dataset_name=dataset or "fine-tuning data",
                   dataset_split="test", metric_type=HUB_METRICS[k][0], metric_name=HUB_METRICS[k][1],
                   metric_value=float(v))
        for k, v in (evaluation.get("metrics") or {}).items() if k in HUB_METRICS
    ]
    return ModelCardData(
        library_name="gfm",
        license=config.get("license", license),
        tags=["gfm", "earth-observation", "remote-sensing", "geospatial", "masked-autoencoder", *sensors],
        pipeline_tag=pipeline,
        base_model=task.get("base_model"),
        datasets=[dataset] if dataset else None,
        model_name=f"{name} ({task.get('task')}, {task.get('method')})" if results else None,
        eval_results=results or None,
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def model_card(config: Mapping[str, Any], license: str = "other") -> str:
    """The generated ``README.md`` of an export: what, data, bands, load and normalise, results, limits."""
    arch = config.get("architecture") or {}
    train = config.get("training") or {}
    data = train.get("data") or {}
    task = config.get("task")
    bands = config.get("bands") or {}
    name = (config.get("model") or {}).get("name", "gfm model")
    params = arch.get("parameters")
    card_data = card_metadata(config, license)
    lines = [
        "---", card_data.to_yaml(), "---", "",
        f"# {name}", "",
        f"A {'fine-tuned ' if task else ''}{arch.get('class', 'gfm')} geospatial model "
        f"({params / 1e6:.1f} M parameters) exported by gfm {config.get('gfm_version')}. "
        "The encoder is a LESS ViT: any number of bands from any sensor, each embedded from its "
        "physical description (wavelength, bandwidth, kind, date), on a token grid of observations × positions."
        if params else f"A gfm model exported by gfm {config.get('gfm_version')}.",
        "",
        "## Training", "",
        (f"- weights: {train.get('source', {}).get('kind')} at step {_fmt(train.get('step'))}"
        f" ({_fmt(train.get('samples_seen'))} samples seen, effective batch {_fmt(train.get('effective_batch'))})"),
        (f"- engine: {_fmt(train.get('world_size'))} rank(s), ZeRO {_fmt(train.get('zero_stage'))}, "
        f"{_fmt(train.get('precision'))}"),
        (f"- stored weights: {config.get('weights_dtype') or 'float32'}"
         + (" (each weight rounded to bfloat16 at export; loaded into fp32 parameters)"
            if config.get("weights_dtype") == "bfloat16" else "")),
        (f"- data: {_fmt(data.get('source'))}; {_fmt(data.get('samples'))} tiles in {_fmt(data.get('shards'))} "
        f"shard(s), sensors {', '.join(data.get('sensors') or []) or '—'}, dates "
        f"{' .. '.join(data.get('dates') or []) or '—'}, tile {_fmt(data.get('tile_size'))} px"),
    ]
    final = train.get("final_metrics") or {}
    if final:
        lines.append("- last logged: " + ", ".join(f"{k} {_fmt(v)}" for k, v in final.items()))
    lines += ["", "## Bands seen in pretraining", ""]
    if bands:
        lines += ["| band | sensor | centre nm | FWHM nm | kind | GSD m | mean | std |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in list(bands.values())[:60]:
            st = b.get("stats") or {}
            lines.append(f"| {b.get('name')} | {b.get('sensor')} | {_fmt(b.get('center_nm'))} | "
                         f"{_fmt(b.get('fwhm_nm'))} | {b.get('kind')} | {_fmt(b.get('gsd_m'))} | "
                         f"{_fmt(st.get('mean'))} | {_fmt(st.get('std'))} |")
        if len(bands) > 60:
            lines.append(f"\n{len(bands) - 60} more bands: see `bands` in config.json.")
    else:
        lines.append("No band statistics were recorded (the run did not read shards with an index.json); "
                     "`prepare` needs `stats=` for every band.")
    lines += [
        "", "## Load and normalise", "",
        "```python",
        "import gfm",
        f"model = gfm.from_pretrained(\"{config.get('_repo', 'PATH_OR_REPO')}\")  # strict keys, eval mode",
        "batch = model.prepare(raw, bands=[\"sensor/B04\", ...], gsd=10.0, dates=[\"2021-06-01\", ...])",
        "emb = model.embed(batch)            # [B, D], valid-weighted mean of per-position tokens",
        "tokens = model.features(batch)      # [B, C+1, N+1, D]",
        "```", "",
        ("`prepare` normalises raw values as in pretraining: `(raw - mean) / std` per band with the statistics "
        "above (the stored digital numbers, before the sensor's scale/offset); nodata, NaN and masked pixels "
        "become invalid. A band without statistics is refused with its name; pass `stats=` (or "
        "`gfm predict/embed --stats index.json`) or drop it. Unknown metadata: date NaN, GSD NaN, "
        "location omitted; the model has an 'unknown' path for each (see `inputs` in config.json)."),
        "", ("Command line: `gfm embed SHARDS_OR_SCENE --model DIR --out tiles.parquet` (GeoParquet), "
        "`gfm predict SCENE.tif --model DIR --out pred.tif` (Cloud-Optimized GeoTIFF, with a task head)."),
    ]
    if task:
        names = task.get("class_names") or []
        how = "merged into the weights" if task.get("merged") else "in `adapter/` (peft format), beside the base"
        lines += [
            "", "## Task", "",
            f"{task.get('task')} with {task.get('num_classes')} classes ({', '.join(map(str, names[:20]))}"
            f"{' ...' if len(names) > 20 else ''}); fine-tuned with {task.get('method')}, {how}. "
            f"`gfm predict SCENE --model DIR --out pred.tif` writes the class map.",
        ]
    evaluation = config.get("evaluation")
    lines += ["", "## Evaluation", ""]
    if evaluation and evaluation.get("metrics"):
        lines += [f"Test split of the fine-tuning run ({_fmt(evaluation.get('method'))}, "
                  f"{_fmt(evaluation.get('steps'))} steps, seed {_fmt(evaluation.get('seed'))}):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in evaluation["metrics"].items()]
    else:
        lines.append("No evaluation results came with this run (pretraining only).")
    lines += [
        "", "## Intended use and limits", "",
        ("Feature extraction, embeddings and fine-tuning on multispectral, hyperspectral, SAR and "
        "multi-temporal rasters. Limits: the model only knows the sensors, places and seasons of its training "
        "data (above); band statistics outside those seen make inputs out of distribution; a pretraining-only "
        "export has no task head and predicts no classes; outputs are not validated for operational or "
        "safety-critical decisions."),
        "", "## Licence", "",
        f"`{card_data.license}` for these weights as set at export; the training data's own licences apply.",
        "", "## Citation", "",
        "```bibtex",
        "@article{si2025less,",
        "  title   = {Towards Scalable Foundation Model for Multi-modal and Hyperspectral Geospatial Data},",
        ("  author  = {Si, Haozhe and Wan, Yuxuan and Do, Minh and Vasisht, Deepak and Zhao, Han and "
        "Hamann, Hendrik F.},"),
        "  journal = {arXiv preprint arXiv:2503.12843},",
        "  year    = {2025}",
        "}",
        "```", "",
    ]
    return "\n".join(lines)
