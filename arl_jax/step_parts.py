"""The named pieces of :func:`arl_jax.make_train_step`, for a loop of your own.

``make_train_step`` validates its arguments once and composes, per step,
:func:`modulation_off` (warm-up or the method's window),
:func:`forward_and_loss` (or :func:`accumulated_forward_and_loss`; with a
method's ``per_loss_gradients``, :func:`per_loss_gradients`),
:func:`heldout_statistics`, :func:`modulate`, :func:`apply_update` and
:func:`step_metrics`; a method that alternates per-modality updates (MLA)
runs :func:`alternating_update` instead. Each piece is pure and jittable
and takes a :class:`StepSpec` (model, optimiser, method, device axis) where
it needs one. See docs/own_loop.md for a step assembled from them.
"""

from arl_jax._src.step_parts import BatchSums
from arl_jax._src.step_parts import Outputs
from arl_jax._src.step_parts import StepSpec
from arl_jax._src.step_parts import accumulated_forward_and_loss
from arl_jax._src.step_parts import alternating_update
from arl_jax._src.step_parts import apply_update
from arl_jax._src.step_parts import batch_sums
from arl_jax._src.step_parts import check_outputs
from arl_jax._src.step_parts import forward_and_loss
from arl_jax._src.step_parts import global_share
from arl_jax._src.step_parts import heldout_statistics
from arl_jax._src.step_parts import label_mask
from arl_jax._src.step_parts import micro_batches
from arl_jax._src.step_parts import modulate
from arl_jax._src.step_parts import modulation_off
from arl_jax._src.step_parts import per_loss_gradients
from arl_jax._src.step_parts import per_modality_metrics
from arl_jax._src.step_parts import step_metrics
from arl_jax._src.step_parts import train_outputs
from arl_jax._src.step_parts import unpack_batch
from arl_jax._src.step_parts import zero_masked_rows

__all__ = [
    "BatchSums", "Outputs", "StepSpec", "accumulated_forward_and_loss",
    "alternating_update", "apply_update", "batch_sums", "check_outputs",
    "forward_and_loss", "global_share", "heldout_statistics", "label_mask",
    "micro_batches", "modulate", "modulation_off", "per_loss_gradients",
    "per_modality_metrics", "step_metrics", "train_outputs", "unpack_batch",
    "zero_masked_rows",
]
