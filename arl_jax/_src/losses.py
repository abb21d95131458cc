"""The ARL objective: fused cross-entropy plus unimodal regularisers (Eq. 21-22)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from arl_jax._src import validation as _validation

Array = jax.Array


def _rows(labels: Array, mask: Array | None, num_classes: int
          ) -> tuple[Array, Array]:
  """(float weight of the rows that count, labels clipped into range).

  Concrete labels are checked (and rejected) by the callers; under ``jit`` a
  row whose label is outside ``[0, C)`` gets weight 0 instead of silently
  training as another class (a negative index wraps) or giving NaN.
  """
  ok = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    ok = ok & jnp.asarray(mask, bool)
  return ok.astype(jnp.float32), jnp.clip(labels, 0, num_classes - 1)


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None
                  ) -> Array:
  """Mean softmax cross-entropy over the rows where ``mask`` is True.

  Rows with a label outside ``[0, C)`` (possible only under ``jit``) are
  left out too.
  """
  w, labels = _rows(labels, mask, jnp.shape(logits)[-1])
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


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
    mask: optional ``[batch]`` boolean; False rows (padding) are ignored,
      and so are rows whose label is outside ``[0, C)`` under ``jit``.

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
  ce = loss_terms(fused_logits, unimodal_logits, labels, mask=mask)
  return ce[0] + gamma * jnp.sum(ce[1:])


def loss_terms(fused_logits: Array, unimodal_logits: Mapping[str, Array],
               labels: Array, *, mask: Array | None = None) -> Array:
  """``[CE(p_f, y), CE(p_m1, y), ..., CE(p_mK, y)]`` (modalities sorted).

  The K + 1 masked mean cross-entropies of :func:`arl_loss`, unweighted (in
  one batched computation); a method that needs each term's own gradient
  (MMPareto) pulls them back separately.
  """
  names, _, classes = _validation.check_logits(unimodal_logits)
  w, labels = _rows(labels, mask, classes)
  stacked = jnp.stack([fused_logits] + [unimodal_logits[m] for m in names])
  per_example = _integer_label_cross_entropy(stacked.astype(jnp.float32),
                                             labels)              # [K+1, B]
  return jnp.sum(per_example * w, axis=-1) / jnp.maximum(jnp.sum(w), 1.0)


def _integer_label_cross_entropy(logits: Array, labels: Array) -> Array:
  """``logsumexp_c(x_c) - x_y`` of ``[..., batch, classes]`` logits.

  The same values and gradients as
  ``optax.softmax_cross_entropy_with_integer_labels``, with the true-class
  logit read by a one-hot select instead of a gather: no gather forward and
  no scatter backward (``x_y + 0 + ... + 0 = x_y`` exactly).
  """
  is_label = labels[:, None] == jnp.arange(logits.shape[-1],
                                           dtype=labels.dtype)
  label_logits = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - label_logits
