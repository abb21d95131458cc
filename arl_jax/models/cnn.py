"""Small CNN encoders for 2-D single-channel inputs (spectrograms, grey images).

A few ``3x3 conv [-> BatchNorm] -> ReLU -> 2x2 max-pool`` blocks, global
average pooling and a ``Dense -> ReLU`` to the feature width: cheap enough to
train many runs on a CPU, where the ResNet18 encoders of
:mod:`arl_jax.models.resnet` are not. Layout is NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from arl_jax.models.resnet import conv_init


class ConvEncoder(nn.Module):
  """A small CNN over one ``[h, w]`` channel: ``[batch, ...] -> [batch, features]``.

  Each entry of ``channels`` is one block: a 3x3 convolution (SAME padding),
  BatchNorm (if ``batch_norm``), ReLU and a 2x2 max-pool of stride 2 (VALID,
  so an odd side is floored; an axis already 1 wide is not pooled). Then
  the mean over space (``pool="space"``) or over the second axis only
  (``pool="time"``: the first axis, a spectrogram's frequency, keeps its
  positions and is flattened with the channels), and ``Dense(features) ->
  ReLU``, the feature.

  Cost on a CPU: a batch of 64 129x63 spectrograms at ``first_stride=1`` makes
  a train step of hundreds of milliseconds on one core, nearly all of it in
  the first block at full resolution; ``first_stride=3`` (non-overlapping 3x3
  patches, 43x21 positions) cuts it about tenfold.

  The input may be flat, ``[batch, h * w]`` (row-major, what in-memory sources
  store and the canonical form :meth:`expected_shape` reports to
  :class:`~arl_jax.models.MultimodalClassifier`), or ``[batch, h, w]`` or
  ``[batch, h, w, 1]`` when the encoder is used on its own; any other size
  raises a ValueError naming the expected shape.

  Attributes:
    input_shape: ``(h, w)`` per example, e.g. ``(freq, time)`` of a
      log-spectrogram.
    channels: output channels of the blocks, one block per entry.
    features: width of the output feature.
    first_stride: stride of the first convolution, for a large input such as
      a spectrogram (above 3, the 3x3 kernel skips input values).
    pool: ``"space"`` (mean over both axes: where a pattern is does not
      matter, as in an image) or ``"time"`` (mean over the second axis only:
      for a ``(freq, time)`` spectrogram, where in frequency the energy is
      matters).
    batch_norm: BatchNorm after each convolution (which then has no bias).
    batch_norm_axis_name: device axis over which BatchNorm computes its batch
      statistics under ``pmap`` (``None``: per device; see
      :mod:`arl_jax.parallel`).
    dtype: compute dtype (parameters stay float32).
  """
  input_shape: tuple[int, int]
  channels: Sequence[int] = (16, 32)
  features: int = 64
  first_stride: int = 1
  pool: str = "space"
  batch_norm: bool = True
  batch_norm_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  def expected_shape(self):
    return (math.prod(self.input_shape),)

  def _as_image(self, x: jax.Array) -> jax.Array:
    h, w = (int(s) for s in self.input_shape)
    accepted = ((h * w,), (h, w), (h, w, 1))
    if x.ndim < 2 or tuple(x.shape[1:]) not in accepted:
      who = "ConvEncoder" if self.name is None else f"encoder {self.name!r}"
      raise ValueError(
          f"{who} expects [batch, {h * w}] (flat {h}x{w}), [batch, {h}, {w}] or "
          f"[batch, {h}, {w}, 1]; got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], h, w, 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if len(self.input_shape) != 2 or min(self.input_shape) < 1:
      raise ValueError(f"input_shape must be (h, w) with positive sides; got "
                       f"{self.input_shape}.")
    if self.first_stride < 1:
      raise ValueError(f"first_stride must be >= 1; got {self.first_stride}.")
    if self.pool not in ("space", "time"):
      raise ValueError(f"pool must be 'space' or 'time'; got {self.pool!r}.")
    x = self._as_image(x).astype(self.dtype)
    for i, width in enumerate(self.channels):
      stride = self.first_stride if i == 0 else 1
      # A bias before BatchNorm is cancelled by it (zero gradient): omit it.
      x = nn.Conv(width, (3, 3), stride, padding="SAME",
                  use_bias=not self.batch_norm, dtype=self.dtype,
                  kernel_init=conv_init, name=f"conv{i + 1}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, dtype=self.dtype,
                         axis_name=self.batch_norm_axis_name,
                         name=f"norm{i + 1}")(x)
      x = nn.relu(_max_pool(x))
    if self.pool == "space":
      x = jnp.mean(x, axis=(1, 2))
    else:
      x = jnp.mean(x, axis=2).reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


def _max_pool(x: jax.Array) -> jax.Array:
  """2x2/2 VALID max-pool of ``[b, h, w, c]``; an axis 1 wide is not pooled.

  The maximum of strided slices rather than ``nn.max_pool``: the same values,
  but the gradient is a few selects instead of XLA's select-and-scatter,
  which on a CPU takes longer than the convolution. Applied before the ReLU,
  which commutes with it, so the ReLU runs on a quarter of the values.
  """
  if x.shape[1] > 1:
    x = x[:, :x.shape[1] // 2 * 2]
    x = jnp.maximum(x[:, 0::2], x[:, 1::2])
  if x.shape[2] > 1:
    x = x[:, :, :x.shape[2] // 2 * 2]
    x = jnp.maximum(x[:, :, 0::2], x[:, :, 1::2])
  return x
