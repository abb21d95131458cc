"""Ready-made multimodal classifiers for the paper's settings."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import jax.numpy as jnp

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
                         dtype=jnp.float32,
                         **fusion_kwargs) -> MultimodalClassifier:
  """One MLP encoder per view (any number of views) and a fusion head."""
  names = tuple(input_dims)
  return MultimodalClassifier(
      encoders={m: MLPEncoder(tuple(encoder_widths), input_dim=d, dtype=dtype)
                for m, d in input_dims.items()},
      head=make_fusion(fusion, num_classes, names, dtype=dtype,
                       **fusion_kwargs))
