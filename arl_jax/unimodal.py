"""Unimodal logits from the shared fusion head ("auxiliary regularizers")."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

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
    features: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """Fused logits and every unimodal logit from one fusion-and-classifier.

  ARL's unimodal logits need no extra parameters: they are the *same* fusion
  module and classifier applied with every other modality's representation
  replaced by zeros. For concatenation ``f = W [z_0; z_1] + b``:
  ``p_0 = W [z_0; 0] + b`` and ``p_1 = W [0; z_1] + b`` (bias included).
  Nothing here depends on the kind of fusion: ``head_fn`` is called K + 1
  times, once on the real features and once per modality with the others
  zeroed.

  Args:
    head_fn: maps ``{modality: features}`` to ``[batch, classes]`` logits
      (a closure over the head's parameters, or a bound Flax submodule).
    features: ``{modality: features}`` (each value an array or pytree), K >= 2.

  Returns:
    ``(fused_logits, {modality: unimodal_logits})``.
  """
  names = _validation.modality_names(features, "features")
  fused = head_fn(dict(features))
  unimodal = {m: head_fn(zero_other_modalities(features, m)) for m in names}
  return fused, unimodal
