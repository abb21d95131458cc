"""Fusion-and-classifier heads: ``{modality: features} -> logits``."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConcatFusion(nn.Module):
  """Concatenation fusion and a linear classifier, ``W [z_0; ...; z_K] + b``.

  Attributes:
    num_classes: C.
    modalities: the concatenation order (the classifier's column blocks).
  """
  num_classes: int
  modalities: Sequence[str]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> jax.Array:
    z = jnp.concatenate([features[m] for m in self.modalities], axis=-1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(z)
