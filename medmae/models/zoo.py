"""The registered model flavours. Sizes follow ViT-B/L; ``*_debug`` flavours are tiny and used by every test."""

from __future__ import annotations

from medmae.models.classifier import ClassifierConfig, ViTClassifier
from medmae.models.mae import MAEConfig, MaskedAutoencoderViT
from medmae.models.registry import register_model
from medmae.models.unetr import UNETR, UNETRConfig

VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
VIT_L = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
# Debug encoders: 4 blocks of width 48. Patch 8 on 32³ gives 64 tokens, enough for masking statistics.
VIT_DEBUG = dict(patch_size=8, embed_dim=48, depth=4, num_heads=4, mlp_ratio=2.0)
MAE_DECODER = dict(decoder_embed_dim=384, decoder_depth=8, decoder_num_heads=12)  # the paper's BTCV setting
MAE_DECODER_2D = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)  # He et al.'s default
MAE_DECODER_DEBUG = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
CT = dict(img_size=(96, 96, 96), in_chans=1)
CT_DEBUG = dict(img_size=(32, 32, 32), in_chans=1)
XRAY = dict(img_size=(224, 224), in_chans=1)
XRAY_DEBUG = dict(img_size=(32, 32), in_chans=1)


# ---- MAE ----------------------------------------------------------------------------------------------------------
@register_model(MaskedAutoencoderViT, MAEConfig)
def mae_vit_base_patch16_3d() -> dict:
    """ViT-B/16 MAE on 96³ CT crops, decoder 384×8 (Zhou et al., BTCV)."""
    return {**CT, **VIT_B, **MAE_DECODER}


@register_model(MaskedAutoencoderViT, MAEConfig)
def mae_vit_large_patch16_3d() -> dict:
    """ViT-L/16 MAE on 96³ crops."""
    return {**CT, **VIT_L, **MAE_DECODER}


@register_model(MaskedAutoencoderViT, MAEConfig)
def mae_vit_base_patch16_2d() -> dict:
    """ViT-B/16 MAE on 224² images (ChestX-ray14)."""
    return {**XRAY, **VIT_B, **MAE_DECODER_2D}


@register_model(MaskedAutoencoderViT, MAEConfig)
def mae_vit_3d_debug() -> dict:
    return {**CT_DEBUG, **VIT_DEBUG, **MAE_DECODER_DEBUG}


@register_model(MaskedAutoencoderViT, MAEConfig)
def mae_vit_2d_debug() -> dict:
    return {**XRAY_DEBUG, **VIT_DEBUG, **MAE_DECODER_DEBUG}


# ---- UNETR --------------------------------------------------------------------------------------------------------
@register_model(UNETR, UNETRConfig)
def unetr_vit_base_patch16_3d() -> dict:
    """UNETR with a ViT-B/16 encoder on 96³, 14 classes (BTCV: 13 organs + background)."""
    return {**CT, **VIT_B, "num_classes": 14, "skip_indices": (3, 6, 9)}


@register_model(UNETR, UNETRConfig)
def unetr_vit_base_patch16_2d() -> dict:
    return {**XRAY, **VIT_B, "num_classes": 2, "skip_indices": (3, 6, 9)}


@register_model(UNETR, UNETRConfig)
def unetr_vit_3d_debug() -> dict:
    return {**CT_DEBUG, **VIT_DEBUG, "num_classes": 3, "skip_indices": (0, 1), "feature_size": 8}


@register_model(UNETR, UNETRConfig)
def unetr_vit_2d_debug() -> dict:
    return {**XRAY_DEBUG, **VIT_DEBUG, "num_classes": 3, "skip_indices": (0, 1), "feature_size": 8}


# ---- classifiers --------------------------------------------------------------------------------------------------
@register_model(ViTClassifier, ClassifierConfig)
def vit_base_patch16_2d_cls() -> dict:
    """ViT-B/16 multi-label classifier on 224² (ChestX-ray14: 14 findings)."""
    return {**XRAY, **VIT_B, "num_classes": 14, "drop_path_rate": 0.1}


@register_model(ViTClassifier, ClassifierConfig)
def vit_base_patch16_3d_cls() -> dict:
    return {**CT, **VIT_B, "num_classes": 2}


@register_model(ViTClassifier, ClassifierConfig)
def vit_2d_cls_debug() -> dict:
    return {**XRAY_DEBUG, **VIT_DEBUG, "num_classes": 14}


@register_model(ViTClassifier, ClassifierConfig)
def vit_3d_cls_debug() -> dict:
    return {**CT_DEBUG, **VIT_DEBUG, "num_classes": 2}
