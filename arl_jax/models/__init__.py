"""Flax (Linen) encoders, fusion heads and multimodal classifiers.

Linen rather than NNX: the library's contract is a pure ``apply_fn`` over a
plain nested-dict parameter pytree (what optax labels, ``pmap``/shardings
replicate and orbax saves). Linen's ``apply`` is exactly that; an NNX model
gets there through :func:`nnx_apply_fn` (``nnx.split`` once, a fresh
``nnx.merge`` per call, parameters and state as plain nested dicts).
"""

from arl_jax.models.builders import audio_visual_classifier
from arl_jax.models.builders import multiview_classifier
from arl_jax.models.cnn import ConvEncoder
from arl_jax.models.fusion import ConcatFusion
from arl_jax.models.fusion import FiLMFusion
from arl_jax.models.fusion import GatedFusion
from arl_jax.models.fusion import SharedFusion
from arl_jax.models.fusion import SumFusion
from arl_jax.models.fusion import make_fusion
from arl_jax.models.mlp import MLPEncoder
from arl_jax.models.multimodal import MultimodalClassifier
from arl_jax.models.multimodal import init_model
from arl_jax.models.multimodal import make_apply_fn
from arl_jax.models.multimodal import modality_labels
from arl_jax.models.nnx_adapter import nnx_apply_fn
from arl_jax.models.nnx_adapter import nnx_update_model
from arl_jax.models.resnet import BasicBlock
from arl_jax.models.resnet import FrameEncoder
from arl_jax.models.resnet import ResNet18
from arl_jax.models.resnet import SpectrogramEncoder

__all__ = [
    "BasicBlock",
    "ConcatFusion",
    "ConvEncoder",
    "FiLMFusion",
    "FrameEncoder",
    "GatedFusion",
    "MLPEncoder",
    "MultimodalClassifier",
    "ResNet18",
    "SharedFusion",
    "SpectrogramEncoder",
    "SumFusion",
    "audio_visual_classifier",
    "init_model",
    "make_apply_fn",
    "make_fusion",
    "modality_labels",
    "nnx_apply_fn",
    "nnx_update_model",
    "multiview_classifier",
]
