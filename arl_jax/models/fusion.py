"""Fusion-and-classifier heads: ``{modality: features} -> logits``.

Every head accepts any number of modalities and stays meaningful when all but
one modality's features are zeros, which is how ARL reads unimodal logits out
of the shared head (:func:`arl_jax.fused_and_unimodal_logits`); none of them
needs extra parameters for that.

The linear additive heads (:class:`ConcatFusion`, :class:`SumFusion`,
:class:`SharedFusion`) also have ``partial_logits(features) -> ({m: W_m z_m},
b)``: their fused logits are ``sum_m W_m z_m + b`` and their unimodal logits
``W_m z_m + b``, so one pass over the batch gives both, instead of the head on
``(K + 1) * batch`` stacked rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Features = Mapping[str, jax.Array]
PartialLogits = tuple[dict[str, jax.Array], jax.Array]


def _head_params(module: nn.Module, features: Features):
  """The head's parameters, created first (by its ``__call__``) if absent."""
  if not module.variables.get("params"):
    module(features)      # under init: creates exactly the parameters it uses
  return module.variables["params"]


def _block_products(blocks: Sequence[jax.Array],
                    kernels: Sequence[jax.Array] | jax.Array,
                    dtype) -> list[jax.Array]:
  """``[z_m W_m]_m`` (``z_m``: ``[batch, d_m]``, ``W_m``: ``[d_m, C]``).

  When all blocks and all kernels have one shape, one batched matmul over the
  stack ``[K, batch, d] x [K, d, C]`` (each slice its own product, so a NaN in
  ``z_j`` reaches only ``z_j W_j``); otherwise one matmul per modality.
  ``kernels`` may be given already stacked, ``[K, d, C]``.
  """
  stacked = isinstance(kernels, jax.Array)
  if not (all(z.shape == blocks[0].shape for z in blocks) and (
      stacked or all(w.shape == kernels[0].shape for w in kernels))):
    promoted = [nn.dtypes.promote_dtype(z, kernels[i], dtype=dtype)
                for i, z in enumerate(blocks)]
    return [jax.lax.dot_general(z, w, (((z.ndim - 1,), (0,)), ((), ())))
            for z, w in promoted]
  w = kernels if stacked else jnp.stack(kernels)
  z, w = nn.dtypes.promote_dtype(jnp.stack(blocks), w, dtype=dtype)
  return list(jax.lax.dot_general(z, w, (((2,), (1,)), ((0,), (0,)))))


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

  def partial_logits(self, features: Features) -> PartialLogits:
    """``({m: W_m z_m}, b)`` with ``W = [W_1; ...; W_K]`` split by width."""
    params = _head_params(self, features)["classifier"]
    kernel = params["kernel"]
    widths = [features[m].shape[-1] for m in self.modalities]
    if len(set(widths)) == 1:      # [K * d, C] -> [K, d, C]: a view, no copy
      kernels = kernel.reshape(len(widths), widths[0], kernel.shape[-1])
    else:
      starts = [sum(widths[:i]) for i in range(len(widths))]
      kernels = [kernel[s:s + w] for s, w in zip(starts, widths)]
    terms = _block_products([features[m] for m in self.modalities], kernels,
                            self.dtype)
    return dict(zip(self.modalities, terms)), params["bias"]


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

  def partial_logits(self, features: Features) -> PartialLogits:
    """``({m: W_m z_m}, b)``."""
    params = _head_params(self, features)
    kernels = [params[f"{m}_classifier"]["kernel"] for m in self.modalities]
    terms = _block_products([features[m] for m in self.modalities], kernels,
                            self.dtype)
    return dict(zip(self.modalities, terms)), params["bias"]


class SharedFusion(nn.Module):
  """One linear classifier shared by all modalities: ``sum_m W z_m + b``.

  The shared head of MLA (Zhang et al., CVPR 2024): the same ``W`` (the
  ``classifier`` Dense, kernel ``[d, C]``) scores every modality's features,
  so with the other modalities zeroed ``p_m = W z_m + b``. All modalities'
  feature widths must be equal. The fused logits are computed as
  ``W (sum_m z_m) + b``, the same function with one matmul.
  """
  num_classes: int
  modalities: Sequence[str]
  dtype: jnp.dtype = jnp.float32

  def _check_widths(self, features: Features) -> None:
    widths = {m: features[m].shape[-1] for m in self.modalities}
    if len(set(widths.values())) > 1:
      raise ValueError("the shared fusion head applies one classifier to "
                       "every modality, so all feature widths must be equal; "
                       f"got {widths}.")

  @nn.compact
  def __call__(self, features: Features) -> jax.Array:
    self._check_widths(features)
    z = sum(features[m] for m in self.modalities)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(z)

  def partial_logits(self, features: Features) -> PartialLogits:
    """``({m: W z_m}, b)``: one matmul over the stacked ``[K * batch, d]``."""
    self._check_widths(features)
    params = _head_params(self, features)["classifier"]
    blocks = [features[m] for m in self.modalities]
    z = jnp.concatenate(blocks, axis=0)
    z, kernel = nn.dtypes.promote_dtype(z, params["kernel"], dtype=self.dtype)
    out = jax.lax.dot_general(z, kernel, (((z.ndim - 1,), (0,)), ((), ())))
    terms = jnp.split(out, len(blocks), axis=0)
    return dict(zip(self.modalities, terms)), params["bias"]


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


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "shared": SharedFusion,
           "gated": GatedFusion, "film": FiLMFusion}


def make_fusion(name: str, num_classes: int, modalities: Sequence[str],
                **kwargs) -> nn.Module:
  """Builds a fusion head by name: ``concat``, ``sum``, ``shared``, ``gated``
  or ``film``."""
  if name not in FUSIONS:
    raise ValueError(f"unknown fusion {name!r}; known: {sorted(FUSIONS)}.")
  return FUSIONS[name](num_classes=num_classes, modalities=tuple(modalities),
                       **kwargs)
