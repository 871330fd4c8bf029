"""gfm.model: the LESS ViT encoder family, HyperMAE pretraining model and task heads."""

from gfm.model import registry as registry
from gfm.model.backbone import GFMBackbone
from gfm.model.encoder import LESSViT, as_batch
from gfm.model.heads import ClassificationHead, PixelClassificationHead, SegmentationHead, UPerHead
from gfm.model.mae import HyperMAE, MAEOutput
from gfm.model.registry import ModelConfig, create_model, list_models, register_model

__all__ = [
    "ClassificationHead",
    "GFMBackbone",
    "HyperMAE",
    "LESSViT",
    "MAEOutput",
    "ModelConfig",
    "PixelClassificationHead",
    "SegmentationHead",
    "UPerHead",
    "as_batch",
    "create_model",
    "list_models",
    "register_model",
]
