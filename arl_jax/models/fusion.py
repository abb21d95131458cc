"""Fusion-and-classifier heads: ``{modality: features} -> logits``.

Every head accepts any number of modalities and stays meaningful when all but
one modality's features are zeros, which is how ARL reads unimodal logits out
of the shared head (:func:`arl_jax.fused_and_unimodal_logits`); none of them
needs extra parameters for that.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Features = Mapping[str, jax.Array]


class ConcatFusion(nn.Module):
  """Concatenation and a linear classifier: ``W [z_1; ...; z_K] + b``.

  With the other modalities zeroed, ``p_m = W_m z_m + b`` (bias included).
  """
  num_classes: int
  modalities: Sequence[str]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Features) -> jax.Array:
    z = jnp.concatenate([features[m] for m in self.modalities], axis=-1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(z)


class SumFusion(nn.Module):
  """Per-modality linear maps to class scores, summed: ``sum_m W_m z_m + b``.

  Same function class as concatenation, parameterised per modality (as the
  "sum" fusion of the OGM-GE code base, whose per-modality biases add up to
  the single ``b`` here).
  """
  num_classes: int
  modalities: Sequence[str]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Features) -> jax.Array:
    out = sum(nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                       name=f"{m}_classifier")(features[m])
              for m in self.modalities)
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    return out + bias.astype(out.dtype)


class GatedFusion(nn.Module):
  """Gated multimodal unit (Arevalo et al., 2017) over K modalities.

  ``h_m = tanh(W_m z_m)``, gates ``g = softmax_m(V_m [z_1; ...; z_K])`` per
  hidden unit, ``h = sum_m g_m * h_m``, logits ``= C h + c``. For K = 2 the
  softmax over two gates is the GMU's sigmoid gate.
  """
  num_classes: int
  modalities: Sequence[str]
  hidden: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Features) -> jax.Array:
    names = list(self.modalities)
    h = jnp.stack([jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype,
                                     name=f"{m}_proj")(features[m]))
                   for m in names], axis=1)                    # [B, K, H]
    z = jnp.concatenate([features[m] for m in names], axis=-1)
    gates = nn.Dense(len(names) * self.hidden, dtype=self.dtype, name="gate")(z)
    gates = jax.nn.softmax(gates.reshape(h.shape).astype(jnp.float32), axis=1)
    fused = jnp.sum(gates.astype(h.dtype) * h, axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(fused)


class FiLMFusion(nn.Module):
  """FiLM (Perez et al., 2018): the other modalities modulate a primary one.

  ``(gamma, beta) = split(U [z_j]_{j != primary} + u)``,
  ``h = gamma * (W z_primary) + beta``, logits ``= C h + c``. With the primary
  zeroed the logits come from ``beta`` (the context alone); with the context
  zeroed, from the primary scaled by the bias of ``gamma``.
  """
  num_classes: int
  modalities: Sequence[str]
  primary: str | None = None
  hidden: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Features) -> jax.Array:
    primary = self.primary or self.modalities[0]
    if primary not in self.modalities:
      raise ValueError(f"FiLM primary modality {primary!r} is not one of "
                       f"{list(self.modalities)}.")
    context = jnp.concatenate(
        [features[m] for m in self.modalities if m != primary], axis=-1)
    film = nn.Dense(2 * self.hidden, dtype=self.dtype, name="film")(context)
    gamma, beta = jnp.split(film, 2, axis=-1)
    x = nn.Dense(self.hidden, dtype=self.dtype, name="proj")(features[primary])
    h = nn.relu(gamma * x + beta)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(h)


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "gated": GatedFusion,
           "film": FiLMFusion}


def make_fusion(name: str, num_classes: int, modalities: Sequence[str],
                **kwargs) -> nn.Module:
  """Builds a fusion head by name: ``concat``, ``sum``, ``gated`` or ``film``."""
  if name not in FUSIONS:
    raise ValueError(f"unknown fusion {name!r}; known: {sorted(FUSIONS)}.")
  return FUSIONS[name](num_classes=num_classes, modalities=tuple(modalities),
                       **kwargs)
