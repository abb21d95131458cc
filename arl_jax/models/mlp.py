"""MLP encoders for vector-valued modalities (tabular data, multi-view features)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPEncoder(nn.Module):
  """``Dense -> ReLU`` blocks; the output of the last block is the feature.

  Attributes:
    features: widths of the hidden layers (the last one is the output width).
    dtype: compute dtype (parameters stay float32).
  """
  features: Sequence[int] = (64,)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = x.astype(self.dtype)
    for width in self.features:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return x
