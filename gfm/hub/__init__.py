"""Hugging Face export and import: a trained gfm model as a directory anyone can load, strictly.

An exported model is a directory (or a Hub repository) holding

- ``config.json``: everything needed to rebuild and feed the model (:func:`hub_config`): the model
  config (``gfm.model.ModelConfig`` fields, rebuilt with ``ModelConfig.build()``), a description of the
  architecture, the bands and sensors seen in pretraining with their physical description, scale/offset,
  nodata and normalisation statistics, what each input tensor means and what to pass when a value is
  unknown, a training summary and the gfm version; for a fine-tuned export, the task and test figures;
- ``model.safetensors``: the weights, names exactly as in the training-time module, in fp32, or in bfloat16
  with ``export(..., dtype="bf16")`` (recorded as ``weights_dtype`` in ``config.json``), which every reader
  here upcasts into the model's fp32 parameters;
- ``README.md``: a generated model card;
- ``adapter/`` (optional): a fine-tuning run's LoRA adapter in peft's format (``adapter_config.json`` +
  ``adapter_model.safetensors``, the task head inside as ``modules_to_save``) or a probe's head, with its
  ``finetune.json``, beside the base weights.

Weights come from a run directory, a DeepSpeed checkpoint of any ZeRO stage (consolidated by ``zero``,
which reads every file with ``torch.load(weights_only=True)``: a crafted pickle is refused, never run), a
``model.safetensors`` file or an exported directory.
:func:`from_pretrained` takes an export directory, a Hub id or the short name of a model shipped inside the
package (:mod:`gfm.pretrained`, whose ``resolve`` is the one rule for model arguments everywhere) and loads
with strict keys: a weight the config does not expect, or one it expects but the file lacks, is an error
listing them (``huggingface_hub``'s mixin defaults to ``strict=False``,
which silently leaves missing weights at their random initialisation).

:func:`prepare` (and :func:`input_bands` for many tiles of one band set) turns raw sensor values plus
band descriptions into the model's input with the stored statistics: ``(raw - mean) / std`` per band,
exactly as the training loader normalised.

Modules: ``base`` (file names, errors, the strict key check), ``sources`` (run, checkpoint, safetensors,
export), ``zero`` (ZeRO checkpoints consolidated without unpickling code), ``config`` (``config.json``),
``model`` (:class:`GFMModel`, :func:`from_pretrained`), ``inputs``, ``adapters`` (fine-tuning outputs on an
exported base), ``card`` (the model card), ``export``.
"""

from gfm.hub.adapters import copy_adapter, evaluation_of, finetune_dir, read_finetune, task_model_from, task_section
from gfm.hub.base import (
    ADAPTER_DIR,
    CARD_NAME,
    COMPLETE,
    CONFIG_NAME,
    FINETUNE_MANIFEST,
    FORMAT,
    FORMAT_VERSION,
    PAPER_URL,
    WEIGHTS_NAME,
    HubError,
    OutputError,
    OutputExistsError,
    Pooling,
    UnknownBandsError,
    check_keys,
    stored_dtype,
    upcast,
    weights_dtype,
)
from gfm.hub.card import model_card
from gfm.hub.config import (
    INPUTS,
    band_table,
    build_net,
    describe_architecture,
    hub_config,
    inputs_section,
    model_config,
    read_index,
    read_stats,
    stats_of,
    training_summary,
)
from gfm.hub.export import ExportReport, export, push_to_hub
from gfm.hub.inputs import InputBands, input_bands, pool, position_validity, prepare
from gfm.hub.model import GFMModel, from_pretrained, load_strict, model_location
from gfm.hub.sources import WeightsSource, load_checkpoint_state_dict, load_state_dict, resolve_source

__all__ = [
    "ADAPTER_DIR",
    "CARD_NAME",
    "COMPLETE",
    "CONFIG_NAME",
    "FINETUNE_MANIFEST",
    "FORMAT",
    "FORMAT_VERSION",
    "INPUTS",
    "PAPER_URL",
    "WEIGHTS_NAME",
    "ExportReport",
    "GFMModel",
    "HubError",
    "InputBands",
    "OutputError",
    "OutputExistsError",
    "Pooling",
    "UnknownBandsError",
    "WeightsSource",
    "band_table",
    "build_net",
    "check_keys",
    "copy_adapter",
    "describe_architecture",
    "evaluation_of",
    "export",
    "finetune_dir",
    "from_pretrained",
    "hub_config",
    "input_bands",
    "inputs_section",
    "load_checkpoint_state_dict",
    "load_state_dict",
    "load_strict",
    "model_card",
    "model_config",
    "model_location",
    "pool",
    "position_validity",
    "prepare",
    "push_to_hub",
    "read_finetune",
    "read_index",
    "read_stats",
    "resolve_source",
    "stats_of",
    "stored_dtype",
    "task_model_from",
    "task_section",
    "training_summary",
    "upcast",
    "weights_dtype",
]
