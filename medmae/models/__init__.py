"""Models: ViT encoder, MAE, UNETR and classifier, built by name through the registry."""

from medmae.models import zoo  # noqa: F401  (registers the flavours)
from medmae.models.classifier import ClassifierConfig, ViTClassifier
from medmae.models.flops import train_flops_per_sample
from medmae.models.mae import MAEConfig, MaskedAutoencoderViT
from medmae.models.memory import TrainMemory, train_memory
from medmae.models.registry import create_model, get_entry, list_models, model_config, register_model
from medmae.models.transfer import (
    EncoderFile,
    adapt_input_channels,
    load_encoder,
    open_encoder,
    read_encoder,
    save_encoder,
)
from medmae.models.unetr import UNETR, UNETRConfig
from medmae.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "UNETR",
    "ClassifierConfig",
    "EncoderFile",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "UNETRConfig",
    "ViTClassifier",
    "ViTConfig",
    "VisionTransformer",
    "adapt_input_channels",
    "create_model",
    "get_entry",
    "list_models",
    "load_encoder",
    "model_config",
    "open_encoder",
    "read_encoder",
    "register_model",
    "save_encoder",
    "TrainMemory",
    "train_flops_per_sample",
    "train_memory",
]
