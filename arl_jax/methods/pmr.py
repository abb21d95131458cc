"""PMR (Fan et al., CVPR 2023): prototypical modal rebalance.

State: one prototype per class and modality, ``C_m [classes, d]``, the class
means of encoder ``m``'s features. Per step, with ``D_m[i, c] = |h_m,i -
C_m,c|`` (the current, differentiable features) and ``P_m = softmax(-D_m)``:

  ``rho = sum_i P_a[i, y_i] / sum_i P_v[i, y_i]``,
  ``beta = alpha [rho < 1]``, ``lambda = alpha [rho > 1]``,
  ``L = CE(p_f, y) + beta CE(-D_a, y) + lambda CE(-D_v, y)``:

the modality whose features cluster less around their class prototype gets a
prototype cross-entropy pulling them there (only its encoder receives it).
Epoch hook (:meth:`PMR.epoch_end`, outside jit): at epoch 0 (before training)
and after every epoch, class means of the features of a seeded tenth of the
training rows in evaluation mode; after epoch 1 they replace the
prototypes, later ``C <- (1 - mu) C_new + mu C_old``; a class absent from
the tenth keeps its prototype.

Follows the official code (``fanyunfeng-bit/Modal-Imbalance-PMR``,
``main_Prototype_grad.py``: alpha 1, mu 0.2, the first tenth of the training
batches; its ``temperature`` argument is unused, and the abstract's entropy
regulariser is not in the code, so not here either). ``a`` is the first
modality in sorted order. Defined for two modalities only (the official code
and the paper have two; BalanceBenchmark's K > 2 variant is an OGM-style
rule, not PMR): K != 2 raises. The prototype terms act inside the official
epoch window (``modulation_starts``, ``modulation_ends``), or after the
warm-up with ``schedule="warmup"``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax.methods.base import Method
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import check_window
from arl_jax.methods.base import official_window
from arl_jax.methods.base import register_method


def prototype_distances(features, prototypes):
  """``D[i, c] = |h_i - C_c|`` (differentiable, finite at 0)."""
  h = features.astype(jnp.float32)
  sq = jnp.sum((h[:, None, :] - prototypes[None].astype(jnp.float32)) ** 2,
               axis=-1)
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int,
                previous: np.ndarray | None = None) -> np.ndarray:
  """Per-class mean rows; a class without rows keeps ``previous`` (or 0)."""
  features = np.asarray(features, np.float64)
  out = (np.zeros((num_classes, features.shape[1])) if previous is None
         else np.asarray(previous, np.float64).copy())
  for c in range(num_classes):
    rows = labels == c
    if np.any(rows):
      out[c] = features[rows].mean(0)
  return out


@register_method
@dataclasses.dataclass(frozen=True)
class PMR(Method):
  """PMR (see the module docstring).

  Attributes:
    alpha: weight of the prototype cross-entropy (official 1.0).
    mu: momentum of the prototypes after epoch 1 (official 0.2).
    fraction: share of the training rows the prototypes are computed from
      (official: the first tenth of the batches).
    schedule: ``"window"`` (official: the prototype terms in epochs
      ``modulation_starts <= e <= modulation_ends``, argparse defaults 0
      and 100; the concat scripts use 70 with alpha 2, mu 0) or
      ``"warmup"`` (off during the train step's warm-up).
    modulation_starts, modulation_ends: the window's first and last epoch.
  """
  name: ClassVar[str] = "pmr"
  has_epoch_hook: ClassVar[bool] = True
  needs_features: ClassVar[bool] = True
  alpha: float = 1.0
  mu: float = 0.2
  fraction: float = 0.1
  schedule: str = "window"
  modulation_starts: int = 0
  modulation_ends: int = 100

  def __post_init__(self):
    super().__post_init__()
    check_window(self)
    _check_concrete(self.alpha, "alpha", lambda v: v > 0, "> 0")
    _check_concrete(self.mu, "mu", lambda v: 0 <= v < 1, "in [0, 1)")
    _check_concrete(self.fraction, "fraction", lambda v: 0 < v <= 1,
                    "in (0, 1]")

  def modulation_window(self):
    return official_window(self)

  def init_state(self, modalities):
    if len(modalities) != 2:
      raise ValueError(f"PMR is defined for two modalities; got "
                       f"{len(modalities)} ({sorted(modalities)}).")
    return {}

  def loss(self, ctx):
    if "prototypes" not in ctx.state:
      raise ValueError("PMR needs its prototypes: run method.epoch_end(0, "
                       "state, context) before the first step (the runner "
                       "does).")
    if ctx.features is None:
      raise ValueError("PMR reads the encoders' features: build apply_fn "
                       "with arl_jax.models.make_apply_fn(model, "
                       "with_features=True), or return (fused, unimodal, "
                       "{modality: features}).")
    a, v = sorted(ctx.unimodal)
    ce, ce_metric, true_prob = {}, {}, {}
    for m in (a, v):
      d = prototype_distances(ctx.features[m], ctx.state["prototypes"][m])
      ce[m] = ctx.cross_entropy(-d)
      # The metric over the global batch (the loss term is this device's
      # share, summed over devices by the step).
      logp = jax.nn.log_softmax(-jax.lax.stop_gradient(d).astype(
          jnp.float32), axis=-1)
      ce_metric[m] = ctx.global_mean(-jnp.take_along_axis(
          logp, ctx.labels[:, None], axis=-1)[:, 0])
      p = jax.nn.softmax(-jax.lax.stop_gradient(d), axis=-1)
      true_prob[m] = ctx.global_mean(jnp.take_along_axis(
          p, ctx.labels[:, None], axis=-1)[:, 0])
    rho = true_prob[a] / jnp.maximum(true_prob[v], 1e-30)
    on = ctx.active.astype(jnp.float32)
    beta = self.alpha * (rho < 1).astype(jnp.float32) * on
    lam = self.alpha * (rho > 1).astype(jnp.float32) * on
    loss = ctx.cross_entropy(ctx.fused) + beta * ce[a] + lam * ce[v]
    return loss, {"metrics": {"pmr_rho": rho,
                              "pmr_weight": {a: beta, v: lam},
                              "prototype_loss": ce_metric}}

  def epoch_end(self, epoch, state, context):
    names = tuple(sorted(context.modalities))
    x, y = context.features("train")
    y = np.asarray(y)
    n = len(y)
    rng = np.random.default_rng([context.seed, 11, epoch])
    rows = np.sort(rng.permutation(n)[:max(1, int(round(self.fraction * n)))])
    old = state.method_state.get("prototypes") if isinstance(
        state.method_state, dict) else None
    prototypes = {}
    for m in names:
      prev = None if old is None else np.asarray(jax.device_get(old[m]),
                                                 np.float64)
      new = class_means(np.asarray(x[m])[rows], y[rows], context.num_classes,
                        prev)
      if epoch >= 2 and prev is not None:
        new = (1 - self.mu) * new + self.mu * prev
      prototypes[m] = jnp.asarray(new, jnp.float32)
    return state.replace(method_state={"prototypes": prototypes}), {
        "prototypes_from_rows": int(len(rows))}
