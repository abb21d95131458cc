"""G-Blending (Wang, Tran, Feiszli, CVPR 2020): loss weights from each
head's overfitting-to-generalisation ratio.

Per step: ``L = w_f CE(p_f, y) + sum_m w_m CE(p_m, y)`` with the weights in
the method state. Epoch hook (outside jit), at epoch 0 (before training) and
every ``super_epoch`` epochs before the last (whose weights no step would
use): for each head ``k`` (the fused one, and each
modality ``m`` alone: the fused head with every other input zeroed before
its encoder), a copy of the current model with a fresh optimiser state
trains ``super_epoch`` epochs on ``CE(f_k(x), y)``; with ``T_j`` the sum of
its per-batch training losses during copy-epoch ``j`` and ``V_j`` the sum of
its per-batch validation losses after it (evaluation mode),

  ``G_k = V_{S-1} - V_0``, ``O_k = (V_{S-1} - T_{S-1}) - (V_0 - T_0)``,
  ``w_k = |G_k| / O_k^2``, normalised to sum to 1.

No official code exists; this follows BalanceBenchmark's online version
(``GBlending_trainer.py``, ``super_epoch`` 10; METHODS_SPEC.md section 2)
with two deliberate changes: the validation split is the run's own
validation split (BalanceBenchmark's is the test split for CREMA-D and
Kinetics-Sounds), and ``O_k = 0`` is guarded (the weight of that head is then
the largest finite one). MultiBench's reading (separate heads, ``|V| /
max(O, 1e-4)^2``) is ``ratio="multibench"``. Any number of modalities.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import register_method


def blending_weights(curves: dict, ratio: str = "delta") -> dict:
  """Normalised ``w_k`` from each head's ``(T_0, T_last, V_0, V_last)``.

  ``ratio="delta"``: ``|V_last - V_0| / O^2`` (BalanceBenchmark);
  ``"multibench"``: ``|V_last| / max(O, 1e-4)^2``; ``O = (V_last - T_last)
  - (V_0 - T_0)``. A head with ``O = 0`` gets the largest finite weight;
  all-zero weights become uniform.

  Branch-free: Python or NumPy numbers give float64 Python floats; JAX
  arrays (or tracers: the function can be jitted and ``jax.vmap``-ed over
  seeds, curves stacked on a leading axis) give JAX arrays.
  """
  if ratio not in ("delta", "multibench"):
    raise ValueError(f"ratio must be 'delta' or 'multibench'; got {ratio!r}.")
  keys = list(curves)
  traced = any(isinstance(v, jax.Array) for c in curves.values() for v in c)
  xp = jnp if traced else np
  t0, t1, v0, v1 = (xp.stack([xp.asarray(curves[k][i], None if traced
                                          else np.float64) for k in keys])
                    for i in range(4))
  o = (v1 - t1) - (v0 - t0)
  if ratio == "multibench":
    raw = xp.abs(v1) / xp.maximum(o, 1e-4) ** 2
  else:
    nonzero = o != 0
    raw = xp.where(nonzero, xp.abs(v1 - v0) / xp.where(nonzero, o, 1.0) ** 2,
                   xp.inf)
  finite = xp.isfinite(raw)
  cap = xp.where(xp.any(finite), xp.max(xp.where(finite, raw, -xp.inf)), 1.0)
  raw = xp.where(finite, raw, cap)
  total = xp.sum(raw)
  positive = total > 0
  w = xp.where(positive, raw / xp.where(positive, total, 1.0),
               1.0 / len(keys))
  if traced:
    return {k: w[i] for i, k in enumerate(keys)}
  return {k: float(w[i]) for i, k in enumerate(keys)}


@register_method
@dataclasses.dataclass(frozen=True)
class GBlending(Method):
  """G-Blending (see the module docstring).

  Attributes:
    super_epoch: epochs between estimations, and epochs each head's copy
      trains (BalanceBenchmark: 10).
    ratio: ``"delta"`` (BalanceBenchmark) or ``"multibench"``.
  """
  name: ClassVar[str] = "g_blending"
  has_epoch_hook: ClassVar[bool] = True
  epoch_hook_over_seeds: ClassVar[bool] = True
  super_epoch: int = 10
  ratio: str = "delta"

  def __post_init__(self):
    super().__post_init__()
    _check_concrete(self.super_epoch, "super_epoch", lambda v: v >= 1, ">= 1")
    if self.ratio not in ("delta", "multibench"):
      raise ValueError(f"ratio must be 'delta' or 'multibench'; got "
                       f"{self.ratio!r}.")

  def init_state(self, modalities):
    heads = ("fused",) + tuple(sorted(modalities))
    return {"weights": {k: jnp.full((), 1.0 / len(heads), jnp.float32)
                        for k in heads}}

  def loss(self, ctx):
    w = ctx.state["weights"]
    loss = w["fused"] * ctx.cross_entropy(ctx.fused)
    for m, z in ctx.unimodal.items():
      loss = loss + w[m] * ctx.cross_entropy(z)
    return loss, {}

  def modulate(self, stats, heldout, state):
    del heldout
    ones = {m: jnp.ones((), jnp.float32) for m in stats}
    return Modulation({m: state["weights"][m] for m in stats}, ones,
                      None), state

  def epoch_end(self, epoch, state, context):
    over_seeds = context.num_seeds is not None
    last = context.num_epochs is not None and epoch >= context.num_epochs
    if epoch % self.super_epoch or last:
      # After the last epoch no step would use new weights.
      return state, ([{}] * context.num_seeds if over_seeds else {})
    if context.fit_copy is None:
      raise ValueError("G-Blending's epoch hook trains copies of the model: "
                       "the EpochContext needs fit_copy (the runner gives "
                       "it).")
    names = tuple(sorted(context.modalities))
    curves = {}
    for head in ("fused",) + names:
      keep = names if head == "fused" else (head,)
      t, v = context.fit_copy(state, keep, self.super_epoch)
      curves[head] = (t[0], t[-1], v[0], v[-1])
    if not over_seeds:
      weights = blending_weights(curves, self.ratio)
      method_state = {"weights": {k: jnp.full((), w, jnp.float32)
                                  for k, w in weights.items()}}
      return state.replace(method_state=method_state), _record(weights,
                                                               curves)
    # Every seed's copies trained at once: the curves carry a seed axis;
    # each seed's weights are computed as for one seed.
    per_seed = [{k: tuple(float(x[s]) for x in c) for k, c in curves.items()}
                for s in range(context.num_seeds)]
    weights = [blending_weights(c, self.ratio) for c in per_seed]
    method_state = {"weights": {k: jnp.asarray([w[k] for w in weights],
                                               jnp.float32)
                                for k in weights[0]}}
    return state.replace(method_state=method_state), [
        _record(w, c) for w, c in zip(weights, per_seed)]


def _record(weights: dict, curves: dict) -> dict:
  return {"weights": weights,
          "curves": {k: list(map(float, c)) for k, c in curves.items()}}
