"""Unimodal logits from the shared fusion head ("auxiliary regularizers")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax._src import validation as _validation

Array = jax.Array


def zero_other_modalities(features: Mapping[str, Any], keep: str
                          ) -> dict[str, Any]:
  """``features`` with every modality but ``keep`` replaced by zeros.

  The zeros are fresh arrays (not ``0 * x``), so a NaN in one modality's
  features cannot leak into another modality's unimodal logits.
  """
  return {m: f if m == keep else jax.tree.map(jnp.zeros_like, f)
          for m, f in features.items()}


def fused_and_unimodal_logits(
    head_fn: Callable[[Mapping[str, Any]], Array],
    features: Mapping[str, Any], *,
    row_independent: bool = True) -> tuple[Array, dict[str, Array]]:
  """Fused logits and every unimodal logit from one fusion-and-classifier.

  ARL's unimodal logits need no extra parameters: they are the *same* fusion
  module and classifier applied with every other modality's representation
  replaced by zeros. For concatenation ``f = W [z_0; z_1] + b``:
  ``p_0 = W [z_0; 0] + b`` and ``p_1 = W [0; z_1] + b`` (bias included).

  A linear additive head (``f = sum_m W_m z_m + b``: concat, sum and shared
  fusion) says so by a method ``partial_logits(features) -> ({m: W_m z_m},
  b)``; then ``p_m = W_m z_m + b`` and ``f = sum_m W_m z_m + b`` come from
  one pass over the batch (:func:`logits_from_partial_sums`), the same
  function up to float rounding of the sum, and ``row_independent`` is
  irrelevant. Any other head (gated, FiLM, a closure) goes the generic way:

  With ``row_independent=True`` (default) the K + 1 inputs (real features,
  then each modality alone) are stacked along the batch axis and the head runs
  once on ``(K + 1) * batch`` rows: one large matmul instead of K + 1 small
  ones. That requires a head whose output rows depend only on their own input
  rows (true of every linear, gated, FiLM or attention-over-modalities head;
  false for a head with BatchNorm in training mode). Otherwise pass
  ``row_independent=False`` to call ``head_fn`` K + 1 times.

  Args:
    head_fn: maps ``{modality: features}`` to ``[batch, classes]`` logits
      (a closure over the head's parameters, or a bound Flax submodule),
      optionally with ``partial_logits`` (see above).
    features: ``{modality: features}`` (arrays with a leading batch axis),
      K >= 2.
    row_independent: see above.

  Returns:
    ``(fused_logits, {modality: unimodal_logits})``.
  """
  names = _validation.modality_names(features, "features")
  partial_logits = getattr(head_fn, "partial_logits", None)
  if partial_logits is not None:
    terms, bias = partial_logits(dict(features))
    return logits_from_partial_sums(terms, bias)
  if not row_independent:
    fused = head_fn(dict(features))
    unimodal = {m: head_fn(zero_other_modalities(features, m)) for m in names}
    return fused, unimodal
  # Row block 0: all modalities; block 1 + i: modality i alone.
  variants = len(names) + 1

  def stack(m, x):
    keep = np.array([True] + [v == m for v in names])
    keep = keep.reshape((variants,) + (1,) * x.ndim)
    # `where`, not a multiplication: a NaN elsewhere must not leak in.
    out = jnp.where(keep, x[None], 0)
    return out.reshape((variants * x.shape[0],) + x.shape[1:])

  stacked = {m: jax.tree.map(functools.partial(stack, m), f)
             for m, f in features.items()}
  logits = head_fn(stacked)
  logits = logits.reshape((variants, -1) + logits.shape[1:])
  return logits[0], {m: logits[i + 1] for i, m in enumerate(names)}


def logits_from_partial_sums(terms: Mapping[str, Array], bias: Array
                             ) -> tuple[Array, dict[str, Array]]:
  """Fused and unimodal logits of a linear additive head from its terms.

  .. math::
    p_f = \\sum_m t_m + b, \\qquad p_m = t_m + b, \\qquad t_m = W_m z_m

  ``terms`` are ``{modality: [batch, classes]}`` and ``bias`` is
  ``[classes]``. The terms are stacked once (``[K, batch, classes]``), so
  the fused sum is one reduction and the unimodal logits are slices of one
  array; ``p_m`` reads ``t_m`` only (a NaN elsewhere cannot reach it). The
  sum is accumulated in at least float32 and returned in the terms' dtype.
  """
  names = _validation.modality_names(terms, "partial logits")
  stacked = jnp.stack([terms[m] for m in names])
  dtype = stacked.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  bias = jnp.asarray(bias)
  fused = (jnp.sum(stacked.astype(acc), axis=0) + bias.astype(acc)).astype(dtype)
  unimodal = stacked + bias.astype(dtype)
  return fused, {m: unimodal[i] for i, m in enumerate(names)}
