"""MMPareto (Wei & Hu, ICML 2024): Pareto-style gradient integration.

Per encoder ``m``, with ``g_mm`` the gradient of the multimodal loss
``CE(p_f, y)`` and ``g_u`` that of its unimodal loss ``CE(p_m, y)`` over the
encoder's parameters:

* ``cos_m = <g_mm, g_u> / (|g_mm| |g_u|)`` over the whole encoder;
* ``w_m = 1/2`` if ``cos_m > 0``, else the two-vector min-norm weight
  ``w = (|g_u|^2 - p) / (|g_mm|^2 + |g_u|^2 - 2p)``, ``p = <g_mm, g_u>``
  (clipped to 0.999 / 0.001 where ``p`` reaches a squared norm);
* per parameter tensor ``t``: ``n_t = 2 (w g_mm[t] + (1 - w) g_u[t])``,
  gradient ``Gamma n_t max(1, |g_mm[t] + g_u[t]| / |n_t|)``, ``Gamma = 1.5``.

Every other parameter (the fusion head) gets the plain gradient of
``CE(p_f) + sum_m CE(p_m)``. The per-loss gradients come from one forward
pass and one ``jax.vjp`` (:attr:`Method.per_loss_gradients`) with two
cotangents, ``CE(p_f)`` and ``sum_m CE(p_m)`` (restricted to encoder ``m``
the sum's gradient is ``CE(p_m)``'s, since the other unimodal logits zero
``m``'s features): two backward passes whatever K, not one per loss.

Follows the official code (``GeWu-Lab/MMPareto_ICML2024``,
``code/MMPareto.py`` and ``min_norm_solvers.py``): cosine per encoder,
magnitude per tensor, ``Gamma = 1.5`` hard-coded there. Two differences, by
design of this library: the unimodal logits are the shared head's with the
other modalities zeroed (the official model has separate unimodal heads;
BalanceBenchmark slices the concat head, which for a linear head is the same
as here), and the surgery is off during the runner's warm-up (``active``;
the official code has none: use ``warmup_steps=0``). BalanceBenchmark's
version accumulates the three backward passes, so its cosine is always 1 and
no surgery happens (METHODS_SPEC.md, section 5); not reproduced. Any number
of modalities: each encoder pairs ``g_mm`` with its own unimodal gradient, as
the official code does for two.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from arl_jax.methods.base import Method
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import register_method

Array = jax.Array


def min_norm_weight(dot: Array, sq_mm: Array, sq_u: Array) -> Array:
  """Weight of ``g_mm`` in the min-norm point of ``{g_mm, g_u}``'s hull."""
  interior = (sq_u - dot) / jnp.maximum(sq_mm + sq_u - 2.0 * dot, 1e-30)
  return jnp.where(dot >= sq_mm, 0.999, jnp.where(dot >= sq_u, 0.001,
                                                  interior))


def pareto_weight(dot: Array, sq_mm: Array, sq_u: Array) -> tuple[Array, Array]:
  """``(w, cos)``: 1/2 when the gradients agree (cos > 0), else min-norm."""
  norm = jnp.sqrt(sq_mm) * jnp.sqrt(sq_u)
  cos = jnp.where(norm > 0, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jnp.where(cos > 0, 0.5, min_norm_weight(dot, sq_mm, sq_u)), cos


def integrate(g_mm: list[Array], g_u: list[Array], magnitude: float = 1.5
              ) -> tuple[list[Array], Array, Array]:
  """MMPareto's gradient of one encoder from its two per-loss gradients.

  Args:
    g_mm, g_u: the encoder's parameter tensors' gradients of the multimodal
      and of its unimodal loss (same order and shapes).
    magnitude: ``Gamma`` (1.5 in the official code).

  Returns:
    ``(gradients, w, cos)``.
  """
  f32 = lambda x: x.astype(jnp.float32)
  dot = sum(jnp.vdot(f32(a), f32(b)) for a, b in zip(g_mm, g_u))
  sq_mm = sum(jnp.vdot(f32(a), f32(a)) for a in g_mm)
  sq_u = sum(jnp.vdot(f32(b), f32(b)) for b in g_u)
  w, cos = pareto_weight(dot, sq_mm, sq_u)
  out = []
  for a, b in zip(g_mm, g_u):
    n = 2.0 * (w * f32(a) + (1.0 - w) * f32(b))
    n_norm = jnp.linalg.norm(n.ravel())
    total = jnp.linalg.norm((f32(a) + f32(b)).ravel())
    ratio = jnp.where(n_norm > 0, total / jnp.where(n_norm > 0, n_norm, 1.0),
                      1.0)
    out.append((magnitude * n * jnp.maximum(1.0, ratio)).astype(a.dtype))
  return out, w, cos


@register_method
@dataclasses.dataclass(frozen=True)
class MMPareto(Method):
  """MMPareto's per-encoder gradient integration (see the module docstring).

  Attributes:
    magnitude: ``Gamma``, the rescale of the integrated gradient (official
      code: 1.5).
    separate_unimodal: pull each unimodal loss back on its own (K + 1
      backward passes) instead of their sum (2 passes). The sum gives each
      encoder its own unimodal gradient exactly when a unimodal logit zeroes
      the other modalities' *features* (this library's models); a model
      that zeroes their *inputs* needs True.
    gamma, warmup_gamma: weight of the unimodal losses in the reported loss
      and in the head's gradient (1: the official ``L_mm + L_a + L_v``).
  """
  name: ClassVar[str] = "mmpareto"
  per_loss_gradients: ClassVar[bool] = True
  gamma: float = 1.0
  warmup_gamma: float = 1.0
  magnitude: float = 1.5
  separate_unimodal: bool = False

  def loss_cotangents(self, names):
    if self.separate_unimodal:
      return super().loss_cotangents(names)
    # Two backward passes whatever K: CE(p_f) and sum_m CE(p_m). Restricted
    # to encoder m, the second is CE(p_m)'s gradient alone, because p_k
    # (k != m) zeroes m's *features* (fused_and_unimodal_logits).
    k = len(names)
    return {"fused": (1.0,) + (0.0,) * k, "unimodal": (0.0,) + (1.0,) * k}

  def __post_init__(self):
    super().__post_init__()
    _check_concrete(self.magnitude, "magnitude", lambda v: v > 0, "> 0")

  def combine_gradients(self, grads, labels, active):
    fused = grads["fused"]
    leaves, treedef = jax.tree.flatten(fused)
    label_leaves = jax.tree.leaves(labels)
    if len(label_leaves) != len(leaves):
      raise ValueError("the labels tree does not match the gradients' "
                       f"({len(label_leaves)} vs {len(leaves)} leaves).")
    if "unimodal" in grads:       # sum_m CE(p_m)'s gradient: m's on encoder m
      total = jax.tree.leaves(grads["unimodal"])
      names = sorted({lab for lab in label_leaves if lab != "shared"})
      per_loss = {m: total for m in names}
      unimodal_sum = total
    else:
      names = sorted(m for m in grads if m != "fused")
      per_loss = {m: jax.tree.leaves(grads[m]) for m in names}
      unimodal_sum = [sum(per_loss[m][i] for m in names)
                      for i in range(len(leaves))]
    # Plain: the gradient of CE(p_f) + gamma * sum_m CE(p_m) (the head's).
    plain = [g + self.gamma * u for g, u in zip(leaves, unimodal_sum)]
    out = list(plain)
    diagnostics = {"cos": {}, "pareto_weight": {}}
    for m in names:
      idx = [i for i, lab in enumerate(label_leaves) if lab == m]
      if not idx:
        raise ValueError(f"no parameter is labelled {m!r}: MMPareto needs "
                         "each modality's encoder (arl_jax.label_modalities).")
      new, w, cos = integrate([leaves[i] for i in idx],
                              [per_loss[m][i] for i in idx], self.magnitude)
      for i, g in zip(idx, new):
        out[i] = jnp.where(active, g, plain[i])
      diagnostics["cos"][m] = cos
      diagnostics["pareto_weight"][m] = w
    return jax.tree.unflatten(treedef, out), diagnostics
