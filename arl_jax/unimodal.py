"""Unimodal logits from the shared fusion head ("auxiliary regularizers")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax import _validation

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
  Nothing here depends on the kind of fusion.

  With ``row_independent=True`` (default) the K + 1 inputs (real features,
  then each modality alone) are stacked along the batch axis and the head runs
  once on ``(K + 1) * batch`` rows: one large matmul instead of K + 1 small
  ones. That requires a head whose output rows depend only on their own input
  rows (true of every linear, gated, FiLM or attention-over-modalities head;
  false for a head with BatchNorm in training mode). Otherwise pass
  ``row_independent=False`` to call ``head_fn`` K + 1 times.

  Args:
    head_fn: maps ``{modality: features}`` to ``[batch, classes]`` logits
      (a closure over the head's parameters, or a bound Flax submodule).
    features: ``{modality: features}`` (arrays with a leading batch axis),
      K >= 2.
    row_independent: see above.

  Returns:
    ``(fused_logits, {modality: unimodal_logits})``.
  """
  names = _validation.modality_names(features, "features")
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
