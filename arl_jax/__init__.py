"""arl_jax: Asymmetric Representation Learning (ICCV 2025) in JAX, Flax and optax.

Pure functions for the per-modality statistics and coefficients, an optax
transformation that rescales each encoder's gradients, and one jittable train
step that composes them. Every per-modality value is a mapping keyed by
modality name; any number of modalities K >= 2.

The names below, by concept:

* the train and eval steps: :func:`make_train_step`, :func:`make_eval_step`,
  :class:`TrainState`;
* balancing methods: :class:`Method` and its registered subclasses
  (:class:`ARL`, :class:`OGMGE`, :class:`PMR`, ...), :func:`make_method`,
  :func:`method_names`, :func:`register_method`, their contexts;
* coefficient rules (:mod:`arl_jax.coefficients`): each from logits and,
  for the train step's batch sums, ``*_from_statistics``;
* per-modality statistics (:mod:`arl_jax.statistics`);
* the optax transformation that applies the scales
  (:func:`scale_by_modality`, :func:`with_modality_scales`,
  :func:`label_modalities`);
* losses and unimodal logits; the modules :mod:`estimators`,
  :mod:`fusion_weighting`, :mod:`optimizer_checks`, :mod:`parallel`.
"""

from arl_jax import estimators
from arl_jax import fusion_weighting
from arl_jax import optimizer_checks
from arl_jax import parallel
from arl_jax.coefficients import arl_coefficients
from arl_jax.coefficients import arl_coefficients_from_statistics
from arl_jax.coefficients import ogm_ge_coefficients
from arl_jax.coefficients import released_arl_coefficients
from arl_jax.coefficients import released_arl_coefficients_from_statistics
from arl_jax.labels import label_modalities
from arl_jax.losses import arl_loss
from arl_jax.losses import cross_entropy
from arl_jax.methods import AGM
from arl_jax.methods import ARL
from arl_jax.methods import OGMGE
from arl_jax.methods import PMR
from arl_jax.methods import ARLNoResidual
from arl_jax.methods import ARLReleased
from arl_jax.methods import ARLReleasedApplied
from arl_jax.methods import DiagnoseRelearn
from arl_jax.methods import EpochContext
from arl_jax.methods import GBlending
from arl_jax.methods import LossContext
from arl_jax.methods import Method
from arl_jax.methods import MLA
from arl_jax.methods import MMPareto
from arl_jax.methods import Modulation
from arl_jax.methods import UnimodalRegularisation
from arl_jax.methods import make_method
from arl_jax.methods import method_names
from arl_jax.methods import register_method
from arl_jax.modality_values import ModalityValues
from arl_jax.statistics import DEFAULT_ENTROPY_FLOOR
from arl_jax.statistics import ModalityStatistics
from arl_jax.statistics import entropy
from arl_jax.statistics import modality_statistics
from arl_jax.statistics import optimization_dependency
from arl_jax.statistics import prediction_statistics
from arl_jax.statistics import unimodal_inverse_variance
from arl_jax.train_step import TrainState
from arl_jax.train_step import make_eval_step
from arl_jax.train_step import make_train_step
from arl_jax.transforms import ScaleByModalityState
from arl_jax.transforms import scale_by_modality
from arl_jax.transforms import with_modality_scales
from arl_jax.unimodal import fused_and_unimodal_logits
from arl_jax.unimodal import zero_other_modalities

__version__ = "0.1.0"

# Public names that moved to their module (still readable here, with a
# DeprecationWarning): ``arl_jax.<name>`` -> ``<module>.<name>``.
_MOVED = {"ogm_ge_coefficients_from_statistics": "arl_jax.coefficients"}


def __getattr__(name):
  if name in _MOVED:
    import importlib
    import warnings
    warnings.warn(f"arl_jax.{name} is deprecated: use {_MOVED[name]}.{name}.",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
  raise AttributeError(f"module 'arl_jax' has no attribute {name!r}")

__all__ = [
    "AGM",
    "ARL",
    "ARLNoResidual",
    "ARLReleased",
    "ARLReleasedApplied",
    "DEFAULT_ENTROPY_FLOOR",
    "DiagnoseRelearn",
    "EpochContext",
    "GBlending",
    "LossContext",
    "MLA",
    "MMPareto",
    "ModalityValues",
    "Method",
    "ModalityStatistics",
    "Modulation",
    "OGMGE",
    "PMR",
    "ScaleByModalityState",
    "TrainState",
    "UnimodalRegularisation",
    "arl_coefficients",
    "arl_coefficients_from_statistics",
    "arl_loss",
    "cross_entropy",
    "entropy",
    "estimators",
    "fusion_weighting",
    "fused_and_unimodal_logits",
    "label_modalities",
    "make_eval_step",
    "make_method",
    "make_train_step",
    "method_names",
    "modality_statistics",
    "ogm_ge_coefficients",
    "optimization_dependency",
    "optimizer_checks",
    "parallel",
    "prediction_statistics",
    "register_method",
    "released_arl_coefficients",
    "released_arl_coefficients_from_statistics",
    "scale_by_modality",
    "unimodal_inverse_variance",
    "with_modality_scales",
    "zero_other_modalities",
]
