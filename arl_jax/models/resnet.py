"""ResNet18 encoders (He et al., 2016) for spectrograms and video frames.

Layout is NHWC (what XLA's GPU/TPU convolutions prefer). The trunk is the
standard ResNet18: 7x7/2 stem, 3x3/2 max-pool, BasicBlocks [2, 2, 2, 2] of
64/128/256/512 filters, global average pooling to 512 features; convolutions
have no bias, BatchNorm as in torchvision (momentum 0.1 there, 0.9 here by
Flax's convention, epsilon 1e-5), Kaiming-normal (fan-out) initialisation.
Parameter count without the classifier: 11,176,512 for 3 input channels,
11,170,240 for 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from arl_jax._src import imagenet as _imagenet

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (1x1 projection if needed)."""
  filters: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    y = conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3), 1, padding=1)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), self.strides, name="downsample_conv")(x)
      x = norm(name="downsample_norm")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet18 trunk: ``[N, H, W, C] -> [N, 512]``."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False,
                dtype=self.dtype, kernel_init=conv_init, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, name="stem_norm")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, strides, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    return jnp.mean(x, axis=(1, 2))


class SpectrogramEncoder(nn.Module):
  """ResNet18 over a 1-channel log-spectrogram ``[batch, freq, time]``.

  Attributes:
    input_shape: ``(freq, time)`` expected per example (CREMA-D: (257, 188);
      Kinetics-Sounds and AVE: (257, 1004)); ``None`` accepts any.
  """
  input_shape: tuple[int, int] | None = (257, 188)
  dtype: jnp.dtype = jnp.float32

  def expected_shape(self):
    return None if self.input_shape is None else tuple(self.input_shape)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return ResNet18(dtype=self.dtype, name="resnet")(x[..., None], train)


class FrameEncoder(nn.Module):
  """ResNet18 over ``T`` RGB frames ``[batch, T, H, W, 3]``, features averaged.

  The frames are folded into the batch (``[batch * T, H, W, 3]``), encoded
  independently and their pooled features averaged over time, as the
  reference implementation does. uint8 frames (what the input pipeline
  emits) are normalised here with the ImageNet mean and std; float frames
  are taken as already normalised.
  """
  num_frames: int = 1
  image_size: int | None = 224
  dtype: jnp.dtype = jnp.float32

  def expected_shape(self):
    size = self.image_size
    return (self.num_frames, size, size, 3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.dtype == jnp.uint8:
      mean = jnp.array(_imagenet.MEAN, jnp.float32)
      std = jnp.array(_imagenet.STD, jnp.float32)
      x = (x.astype(jnp.float32) / 255.0 - mean) / std
    b, t = x.shape[:2]
    z = ResNet18(dtype=self.dtype, name="resnet")(
        x.reshape((b * t,) + x.shape[2:]), train)
    return jnp.mean(z.reshape(b, t, -1), axis=1)
