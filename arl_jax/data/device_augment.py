"""Random resized crop, flip and resize of uint8 frames on the accelerator.

The fast path of the audio-visual pipeline (``av_batches(...,
augment="device")``): the host only reads the record and decodes the sampled
JPEG frames into a fixed zero-padded canvas ``[B, T, H_c, W_c, 3]`` (each
frame's true size in ``batch["frame_hw"]``); :class:`FrameAugmentation`,
traced into the train and eval steps (``make_train_step(...,
preprocess=aug.train)``), does on the device what the reference's
torchvision transforms do per sample on the host:

* crop box (``RandomResizedCrop``): area fraction ``~ U(0.08, 1)``, log aspect
  ratio ``~ U(log 3/4, log 4/3)``, width and height rounded; up to 10 draws,
  the first that fits the frame, else the central square (the same rule as
  the host :func:`arl_jax.data.av_pipeline.random_resized_crop`);
* horizontal flip with probability 1/2;
* resampling with PIL's bilinear (triangle) filter, widened by the
  downscaling factor as PIL does (antialiasing): along one axis, output pixel
  ``i`` of a box starting at ``s`` of length ``L`` resized to ``n`` has the
  centre ``c_i = s + (i + 1/2) L / n`` and input pixel ``j`` the weight

      w_ij ∝ max(0, 1 - |j + 1/2 - c_i| / max(L / n, 1)),   0 <= j < size,

  normalised over ``j`` (pixels outside the frame drop out). The weights form
  dense ``[n, H_c]`` and ``[n, W_c]`` matrices, so a frame costs two matmuls
  (0.19 GFLOP at 256x341 -> 224x224, 0.9% of the ResNet18 step's 21 GFLOP
  per sample): cheap on a GPU or TPU, and not fast on a CPU.
  ``precision`` is ``"highest"`` by default (exact float32 sums; a GPU then
  runs these matmuls without tensor cores, a few per cent of a bf16 step by
  estimate); ``"default"`` lets a GPU use TF32 and a TPU bf16 passes, several
  times cheaper, for output that can differ by a grey level or so. The GPU
  preset of ``benchmarks.step`` measures it.

Evaluation resizes the whole frame to ``n x n`` with the same filter, as the
host :class:`arl_jax.data.av_pipeline.HostAugmentation` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def crop_boxes(rng: Array, frame_hw: Array, *, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> Array:
  """Random resized crop boxes ``[..., 4]`` = (top, left, height, width).

  Args:
    rng: a PRNG key.
    frame_hw: int ``[..., 2]`` (height, width) of each frame.
    scale: range of the box area as a fraction of the frame area.
    ratio: range of the box aspect ratio (width / height), sampled in log.
    attempts: draws before falling back to the central square.
  """
  hw = jnp.asarray(frame_hw, jnp.float32)
  h, w = hw[..., 0:1], hw[..., 1:2]
  shape = hw.shape[:-1] + (attempts,)
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  target = h * w * jax.random.uniform(k_area, shape, minval=scale[0],
                                      maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, shape,
                                      minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  cw = jnp.round(jnp.sqrt(target * aspect))
  ch = jnp.round(jnp.sqrt(target / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = jnp.argmax(fits, axis=-1)[..., None]
  cw = jnp.take_along_axis(cw, first, axis=-1)
  ch = jnp.take_along_axis(ch, first, axis=-1)
  top = jnp.floor(jax.random.uniform(k_top, ch.shape) * (h - ch + 1))
  left = jnp.floor(jax.random.uniform(k_left, cw.shape) * (w - cw + 1))
  side = jnp.minimum(h, w)
  fallback = jnp.concatenate([jnp.floor((h - side) / 2), jnp.floor((w - side) / 2),
                              side, side], axis=-1)
  box = jnp.concatenate([top, left, ch, cw], axis=-1)
  return jnp.where(jnp.any(fits, axis=-1, keepdims=True), box, fallback)


def resize_weights(start: Array, length: Array, valid: Array, out_size: int,
                   in_size: int) -> Array:
  """``[out_size, in_size]`` bilinear (antialiased) resampling weights.

  Resamples ``[start, start + length)`` of an axis whose first ``valid``
  entries are real pixels (the rest is canvas padding) to ``out_size``.
  """
  step = length / out_size
  support = jnp.maximum(step, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
  j = jnp.arange(in_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(j[None, :] + 0.5 - centre[:, None]) / support)
  w = jnp.where(j[None, :] < valid, w, 0.0)
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def resize_box(frame: Array, frame_hw: Array, box: Array, out_size: int,
               flip: Array | bool = False, precision="highest") -> Array:
  """One uint8 frame ``[H_c, W_c, C]``: ``box`` resized to ``out_size``², uint8."""
  in_h, in_w = frame.shape[0], frame.shape[1]
  hw = jnp.asarray(frame_hw, jnp.float32)
  box = jnp.asarray(box, jnp.float32)
  wy = resize_weights(box[0], box[2], hw[0], out_size, in_h)
  wx = resize_weights(box[1], box[3], hw[1], out_size, in_w)
  wx = jnp.where(flip, wx[::-1], wx)
  x = frame.astype(jnp.float32)
  # Width first: H_c * W_c * n + n * H_c * n multiply-adds, the cheaper
  # order for frames wider than tall.
  cols = jnp.einsum("hwc,pw->hpc", x, wx, precision=precision)
  out = jnp.einsum("oh,hpc->opc", wy, cols, precision=precision)
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def _check(batch: Mapping[str, Any], modality: str, size_key: str):
  if size_key not in batch:
    raise ValueError(
        f"device frame augmentation needs batch[{size_key!r}] (the frame "
        "sizes the pipeline writes with augment='device'); the batch has "
        f"{sorted(batch)}. Use av_batches(..., augment='device').")
  inputs = batch.get("inputs", {})
  if modality not in inputs:
    raise ValueError(f"device frame augmentation: no modality {modality!r} in "
                     f"batch['inputs'] (keys {sorted(inputs)}).")
  frames, hw = inputs[modality], batch[size_key]
  if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != jnp.uint8:
    raise ValueError(f"device frame augmentation: {modality!r} must be uint8 "
                     "[batch, frames, height, width, 3]; got "
                     f"{frames.dtype}{list(frames.shape)}.")
  if tuple(hw.shape) != tuple(frames.shape[:2]) + (2,):
    raise ValueError(f"batch[{size_key!r}] must be [batch, frames, 2] = "
                     f"{list(frames.shape[:2]) + [2]}; got {list(hw.shape)}.")
  return frames, hw


@dataclasses.dataclass(frozen=True)
class FrameAugmentation:
  """The train and eval steps' ``preprocess`` (see the module doc).

  ``train(batch, rng)`` and ``eval(batch)`` take a batch from
  ``av_batches(..., augment="device")`` (uint8 canvas frames plus
  ``frame_hw``) and return the usual batch: ``inputs[modality]`` uint8
  ``[B, T, image_size, image_size, 3]``, ``frame_hw`` removed.
  """
  image_size: int = 224
  modality: str = "visual"
  size_key: str = "frame_hw"
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  precision: str = "highest"

  def _apply(self, batch, frames, hw, boxes, flips):
    resize = jax.vmap(jax.vmap(
        lambda f, s, b, fl: resize_box(f, s, b, self.image_size, fl,
                                       precision=self.precision)))
    out = resize(frames, hw, boxes, flips)
    rest = {k: v for k, v in batch.items() if k != self.size_key}
    return {**rest, "inputs": {**batch["inputs"], self.modality: out}}

  def train(self, batch: Mapping[str, Any], rng: Array) -> dict:
    """Random resized crop and flip of every frame (keys from ``rng``)."""
    frames, hw = _check(batch, self.modality, self.size_key)
    k_box, k_flip = jax.random.split(rng)
    boxes = crop_boxes(k_box, hw, scale=self.scale, ratio=self.ratio)
    flips = (jax.random.bernoulli(k_flip, 0.5, frames.shape[:2]) if self.flip
             else jnp.zeros(frames.shape[:2], bool))
    return self._apply(batch, frames, hw, boxes, flips)

  def eval(self, batch: Mapping[str, Any]) -> dict:
    """The whole frame resized to ``image_size`` x ``image_size``."""
    frames, hw = _check(batch, self.modality, self.size_key)
    size = jnp.asarray(hw, jnp.float32)
    boxes = jnp.concatenate([jnp.zeros_like(size), size], axis=-1)
    return self._apply(batch, frames, hw, boxes,
                       jnp.zeros(frames.shape[:2], bool))
