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
    input_dim: expected input width (``None``: any).
    dtype: compute dtype (parameters stay float32).
  """
  features: Sequence[int] = (64,)
  input_dim: int | None = None
  dtype: jnp.dtype = jnp.float32

  def expected_shape(self):
    return None if self.input_dim is None else (self.input_dim,)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = x.astype(self.dtype)
    for width in self.features:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return x
