"""Flax (Linen) encoders, fusion heads and the multimodal classifier."""

from arl_jax.models.fusion import ConcatFusion
from arl_jax.models.mlp import MLPEncoder
from arl_jax.models.multimodal import MultimodalClassifier
from arl_jax.models.multimodal import init_model
from arl_jax.models.multimodal import make_apply_fn
from arl_jax.models.multimodal import modality_labels

__all__ = [
    "ConcatFusion",
    "MLPEncoder",
    "MultimodalClassifier",
    "init_model",
    "make_apply_fn",
    "modality_labels",
]
