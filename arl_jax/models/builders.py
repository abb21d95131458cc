"""Ready-made multimodal classifiers for the paper's settings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence

import jax.numpy as jnp

from arl_jax.models.cnn import ConvEncoder
from arl_jax.models.fusion import make_fusion
from arl_jax.models.mlp import MLPEncoder
from arl_jax.models.multimodal import MultimodalClassifier
from arl_jax.models.resnet import FrameEncoder
from arl_jax.models.resnet import SpectrogramEncoder


def audio_visual_classifier(num_classes: int, *,
                            audio_shape: tuple[int, int] | None = (257, 188),
                            num_frames: int = 1, image_size: int | None = 224,
                            fusion: str = "concat", dtype=jnp.float32,
                            **fusion_kwargs) -> MultimodalClassifier:
  """Two ResNet18 encoders (``audio``, ``visual``) and a fusion head.

  Defaults are CREMA-D's (spectrogram 257x188, one 224x224 frame, 6
  classes in the paper); Kinetics-Sounds and AVE use ``audio_shape=(257,
  1004), num_frames=3``. ``dtype=jnp.bfloat16`` computes in bf16 with float32
  parameters.
  """
  names = ("audio", "visual")
  return MultimodalClassifier(
      encoders={
          "audio": SpectrogramEncoder(input_shape=audio_shape, dtype=dtype),
          "visual": FrameEncoder(num_frames=num_frames, image_size=image_size,
                                 dtype=dtype),
      },
      head=make_fusion(fusion, num_classes, names, dtype=dtype,
                       **fusion_kwargs))


def multiview_classifier(input_dims: Mapping[str, int], num_classes: int, *,
                         encoder_widths: Sequence[int] = (64,),
                         fusion: str = "concat",
                         encoders: Mapping[str, str] | str = "mlp",
                         input_shapes: Mapping[str, tuple[int, int]] | None = None,
                         cnn_channels: Sequence[int] = (16, 32),
                         cnn_first_stride: Mapping[str, int] | int = 1,
                         cnn_pool: Mapping[str, str] | str = "space",
                         dtype=jnp.float32,
                         **fusion_kwargs) -> MultimodalClassifier:
  """One encoder per view (any number of views) and a fusion head.

  ``encoders`` picks each view's encoder, one kind for all or
  ``{modality: kind}`` (every modality named): ``"mlp"`` is an
  :class:`MLPEncoder` of widths ``encoder_widths``; ``"cnn"`` a
  :class:`ConvEncoder` over ``input_shapes[m]`` (whose product must be
  ``input_dims[m]``: the input stays a flat row) with blocks
  ``cnn_channels``, first-convolution stride ``cnn_first_stride`` (one for
  all, or ``{modality: stride}``, 1 for a modality left out), final pooling
  ``cnn_pool`` (``"space"`` or ``"time"``, one for all or ``{modality:
  pool}``, ``"space"`` for a modality left out; see :class:`ConvEncoder`)
  and ``encoder_widths[-1]`` features.
  """
  names = tuple(input_dims)
  if isinstance(encoders, str):
    kinds = dict.fromkeys(names, encoders)
  else:
    if set(encoders) != set(names):
      raise ValueError(f"encoders names modalities {sorted(encoders)}; the "
                       f"inputs are {sorted(names)}.")
    kinds = dict(encoders)
  shapes = dict(input_shapes or {})
  unknown = set(shapes) - set(names)
  if unknown:
    raise ValueError(f"input_shapes names unknown modalities {sorted(unknown)}; "
                     f"the inputs are {sorted(names)}.")
  if isinstance(cnn_first_stride, int):
    strides = dict.fromkeys(names, cnn_first_stride)
  else:
    strides = dict.fromkeys(names, 1) | dict(cnn_first_stride)
  unknown = set(strides) - set(names)
  if unknown:
    raise ValueError(f"cnn_first_stride names unknown modalities "
                     f"{sorted(unknown)}; the inputs are {sorted(names)}.")
  pools = (dict.fromkeys(names, cnn_pool) if isinstance(cnn_pool, str)
           else dict.fromkeys(names, "space") | dict(cnn_pool))
  unknown = set(pools) - set(names)
  if unknown:
    raise ValueError(f"cnn_pool names unknown modalities {sorted(unknown)}; "
                     f"the inputs are {sorted(names)}.")
  modules = {}
  for m, d in input_dims.items():
    if kinds[m] == "mlp":
      modules[m] = MLPEncoder(tuple(encoder_widths), input_dim=d, dtype=dtype)
    elif kinds[m] == "cnn":
      if m not in shapes:
        raise ValueError(f"modality {m!r} has a 'cnn' encoder but no entry in "
                         f"input_shapes.")
      shape = tuple(int(s) for s in shapes[m])
      if len(shape) != 2 or math.prod(shape) != d:
        raise ValueError(f"input_shapes[{m!r}] = {shape} does not describe a "
                         f"flat input of width input_dims[{m!r}] = {d}.")
      modules[m] = ConvEncoder(shape, channels=tuple(cnn_channels),
                               features=int(encoder_widths[-1]),
                               first_stride=int(strides[m]), pool=pools[m],
                               dtype=dtype)
    else:
      raise ValueError(f"unknown encoder {kinds[m]!r} for modality {m!r}; "
                       f"use 'mlp' or 'cnn'.")
  return MultimodalClassifier(
      encoders=modules,
      head=make_fusion(fusion, num_classes, names, dtype=dtype,
                       **fusion_kwargs))
