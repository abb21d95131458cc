"""MLP encoders for vector-valued modalities (tabular data, multi-view features)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPEncoder(nn.Module):
  """``Dense [-> BatchNorm] -> ReLU`` blocks; the last block's output is the feature.

  Attributes:
    features: widths of the hidden layers (the last one is the output width).
    input_dim: expected input width (``None``: any).
    batch_norm: BatchNorm after each Dense.
    batch_norm_axis_name: device axis over which BatchNorm computes its batch
      statistics under ``pmap`` (``None``: per device; see
      :mod:`arl_jax.parallel`).
    dtype: compute dtype (parameters stay float32).
  """
  features: Sequence[int] = (64,)
  input_dim: int | None = None
  batch_norm: bool = False
  batch_norm_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  def expected_shape(self):
    return None if self.input_dim is None else (self.input_dim,)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for width in self.features:
      # A bias before BatchNorm is cancelled by it (zero gradient): omit it.
      x = nn.Dense(width, use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, dtype=self.dtype,
                         axis_name=self.batch_norm_axis_name)(x)
      x = nn.relu(x)
    return x
