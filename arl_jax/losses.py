"""The ARL objective: fused cross-entropy plus unimodal regularisers (Eq. 21-22)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from arl_jax import _validation

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None
                  ) -> Array:
  """Mean softmax cross-entropy over the rows where ``mask`` is True."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if mask is None:
    return jnp.mean(per_example)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def arl_loss(fused_logits: Array, unimodal_logits: Mapping[str, Array],
             labels: Array, gamma: float | Array, *,
             mask: Array | None = None) -> Array:
  """ARL's training objective (Eq. 22).

  .. math::
    L = \\mathrm{CE}(p_f, y) + \\gamma \\sum_m u_m, \\qquad
    u_m = \\mathrm{CE}(p_m, y) \\quad \\text{(Eq. 21)}

  each cross-entropy being a mean over the batch. ``p_m`` are the unimodal
  logits of the shared head with the other modalities zeroed
  (:func:`arl_jax.fused_and_unimodal_logits`).

  Args:
    fused_logits: ``[batch, classes]``.
    unimodal_logits: ``{modality: [batch, classes]}``, K >= 2.
    labels: ``[batch]`` integer labels.
    gamma: weight of the unimodal terms (paper: 4).
    mask: optional ``[batch]`` boolean; False rows (padding) are ignored.

  Returns:
    The scalar loss (differentiable in both the fused and unimodal logits).
  """
  names, batch, classes = _validation.check_logits(unimodal_logits)
  if jnp.shape(fused_logits) != (batch, classes):
    raise ValueError(
        f"fused_logits have shape {jnp.shape(fused_logits)} but the unimodal "
        f"logits have shape {(batch, classes)}.")
  _validation.check_labels(labels, batch, classes)
  _validation.check_mask(mask, batch)
  # All K + 1 cross-entropies in one batched computation.
  stacked = jnp.stack([fused_logits] + [unimodal_logits[m] for m in names])
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      stacked.astype(jnp.float32), labels[None])                  # [K+1, B]
  if mask is None:
    ce = jnp.mean(per_example, axis=-1)
  else:
    w = jnp.asarray(mask, jnp.float32)
    ce = jnp.sum(per_example * w, axis=-1) / jnp.maximum(jnp.sum(w), 1.0)
  return ce[0] + gamma * jnp.sum(ce[1:])
