"""arl_jax: Asymmetric Representation Learning (ICCV 2025) in JAX, Flax and optax.

Pure functions for the per-modality statistics and coefficients, an optax
transformation that rescales each encoder's gradients, and one jittable train
step that composes them. Every per-modality value is a mapping keyed by
modality name; any number of modalities K >= 2.

The public API, as optax lays out its own: the names below and the public
modules; the implementations live in ``arl_jax._src`` (private: its layout
may change between versions).

* the train and eval steps: :func:`make_train_step`, :func:`make_eval_step`,
  :class:`TrainState`, and :class:`ModalityValues` (the per-modality
  metrics);
* the optax transformation that applies the scales: :func:`scale_by_modality`,
  :func:`with_modality_scales` (placed where it acts for any optimiser),
  :func:`label_modalities`;
* the model's outputs: :func:`fused_and_unimodal_logits`,
  :func:`zero_other_modalities`;
* the loss: :func:`arl_loss` (Eq. 22), :func:`cross_entropy`;
* the paper's quantities from logits: :func:`entropy`,
  :func:`unimodal_inverse_variance` (Eq. 17), :func:`optimization_dependency`
  (Eq. 4), :func:`arl_coefficients` (Eq. 18), :func:`released_arl_coefficients`,
  :func:`ogm_ge_coefficients`; the batch sums they are read from,
  :class:`ModalityStatistics` and :func:`modality_statistics`;
* balancing methods: :class:`Method`, its registered subclasses (:class:`ARL`,
  :class:`OGMGE`, :class:`MMPareto`, ...), :func:`make_method`,
  :func:`method_names`, :func:`register_method` and the contexts a method
  receives.

Public modules: :mod:`arl_jax.methods` (one module per method),
:mod:`arl_jax.models`, :mod:`arl_jax.data`, :mod:`arl_jax.parallel`
(``pmap`` and ``jit`` with shardings), :mod:`arl_jax.statistics` (the
building blocks of a new rule), :mod:`arl_jax.estimators`,
:mod:`arl_jax.fusion_weighting` (held-out fusion weighting),
:mod:`arl_jax.epoch_hooks` (a method's epoch hook in your own loop),
:mod:`arl_jax.step_parts` (the named pieces of the train step),
:mod:`arl_jax.optimizer_checks`, :mod:`arl_jax.modality_values`.
"""

from arl_jax import coefficients
from arl_jax import epoch_hooks
from arl_jax import estimators
from arl_jax import fusion_weighting
from arl_jax import modality_values
from arl_jax import optimizer_checks
from arl_jax import parallel
from arl_jax import statistics
from arl_jax import step_parts
from arl_jax._src.coefficients import arl_coefficients
from arl_jax._src.coefficients import ogm_ge_coefficients
from arl_jax._src.coefficients import released_arl_coefficients
from arl_jax._src.labels import label_modalities
from arl_jax._src.losses import arl_loss
from arl_jax._src.losses import cross_entropy
from arl_jax._src.modality_values import ModalityValues
from arl_jax._src.statistics import ModalityStatistics
from arl_jax._src.statistics import entropy
from arl_jax._src.statistics import modality_statistics
from arl_jax._src.statistics import optimization_dependency
from arl_jax._src.statistics import unimodal_inverse_variance
from arl_jax._src.train_step import TrainState
from arl_jax._src.train_step import make_eval_step
from arl_jax._src.train_step import make_train_step
from arl_jax._src.transforms import ScaleByModalityState
from arl_jax._src.transforms import modality_scale_placement
from arl_jax._src.transforms import scale_by_modality
from arl_jax._src.transforms import with_modality_scales
from arl_jax._src.unimodal import fused_and_unimodal_logits
from arl_jax._src.unimodal import zero_other_modalities
from arl_jax.methods import AGM
from arl_jax.methods import ARL
from arl_jax.methods import MLA
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
from arl_jax.methods import MMPareto
from arl_jax.methods import Modulation
from arl_jax.methods import UnimodalRegularisation
from arl_jax.methods import make_method
from arl_jax.methods import method_names
from arl_jax.methods import register_method

__version__ = "0.1.0"

# Names that left the top level, still readable here with a
# DeprecationWarning: name -> (where it lives now, what to use instead).
_MOVED = {
    "DEFAULT_ENTROPY_FLOOR": ("arl_jax.statistics", None),
    "prediction_statistics": ("arl_jax.statistics", None),
    # The rules from batch sums (a custom rule's building blocks) live in
    # arl_jax.coefficients.
    "arl_coefficients_from_statistics": ("arl_jax.coefficients", None),
    "released_arl_coefficients_from_statistics": ("arl_jax.coefficients",
                                                  None),
    "ogm_ge_coefficients_from_statistics": ("arl_jax.coefficients", None),
}


def __getattr__(name):
  if name in _MOVED:
    import importlib
    import warnings
    module, instead = _MOVED[name]
    advice = (f"use {module}.{name}" if instead is None else
              f"use {instead} ({name} is now private, in {module})")
    warnings.warn(f"arl_jax.{name} is deprecated: {advice}.",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)
  raise AttributeError(f"module 'arl_jax' has no attribute {name!r}")


__all__ = [
    "AGM",
    "ARL",
    "ARLNoResidual",
    "ARLReleased",
    "ARLReleasedApplied",
    "DiagnoseRelearn",
    "EpochContext",
    "GBlending",
    "LossContext",
    "MLA",
    "MMPareto",
    "Method",
    "ModalityStatistics",
    "ModalityValues",
    "Modulation",
    "OGMGE",
    "PMR",
    "ScaleByModalityState",
    "TrainState",
    "UnimodalRegularisation",
    "arl_coefficients",
    "arl_loss",
    "coefficients",
    "cross_entropy",
    "entropy",
    "epoch_hooks",
    "estimators",
    "fused_and_unimodal_logits",
    "fusion_weighting",
    "label_modalities",
    "make_eval_step",
    "make_method",
    "make_train_step",
    "method_names",
    "modality_scale_placement",
    "modality_statistics",
    "modality_values",
    "ogm_ge_coefficients",
    "optimization_dependency",
    "optimizer_checks",
    "parallel",
    "register_method",
    "released_arl_coefficients",
    "scale_by_modality",
    "statistics",
    "step_parts",
    "unimodal_inverse_variance",
    "with_modality_scales",
    "zero_other_modalities",
]
