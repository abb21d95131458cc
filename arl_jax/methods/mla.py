"""MLA (Zhang, Yoon, Bansal & Yao, CVPR 2024): multimodal representation
learning by alternating unimodal adaptation.

Training alternates *optimiser steps*, one per modality, inside every step
(:attr:`Method.alternating`): for each modality ``m`` in turn (sorted names:
audio before visual, the official order),

1. ``L_m = CE(W h_m + b, y)``: the shared head on modality ``m``'s features
   alone (the head with the other modalities zeroed, as for ARL's unimodal
   logits; with the ``shared`` fusion head, :class:`arl_jax.models.SharedFusion`,
   exactly the official single linear head applied to each modality);
2. optionally (``projection``), gradient modification against forgetting:
   with ``r = mean_batch(h_m)`` and ``k = P r``,
   ``P <- P - k k^T / (alpha_t + r^T k)``, ``P <- P / ||P||_F``,
   ``alpha_t = 0.1^(1 + i / N)`` (``i`` the batch index in the epoch, ``N``
   batches per epoch), and the head weight's gradient becomes
   ``dW P^T`` (``"replace"``, what the official ``GSPlugin`` intends) or
   ``dW + dW P^T`` (``"add"``, BalanceBenchmark); skipped at the very first
   sub-step of training (``n = 0``);
3. one optimiser update *masked to encoder m and the head*: the other
   encoders' parameters and their optimiser state (momentum, ...) do not
   move; the optimiser's step counter advances once per training step, so
   schedules keep their meaning.

The next modality's loss therefore sees the head already updated. Inference
(:meth:`MLA.eval_logits`) fuses the unimodal logits, ``z = sum_m g_m z_m``:
``gating="batch_entropy"`` (official ``--dynamic``): ``e_m = -sum p log p``
with ``p`` the softmax of ``z_m`` over the *batch* axis, summed over the
batch and classes (one scalar per modality and batch, padded rows left out,
summed over devices under ``pmap``), ``g = softmax(-e)``, one gate per
``gate_batch`` consecutive evaluation rows (official: its 64-row test
loader; 0: per evaluation batch, a number that then depends on the batch
size);
``"sample_entropy"`` (BalanceBenchmark): the same per row with the softmax
over classes; ``"fixed"``: ``fixed_weights`` (official default without
``--dynamic``: 0.55 audio, 0.45 visual; empty means equal weights).

Follows the official code (``Cecile-hi/Multimodal-Learning-with-Alternating-
Unimodal-Adaptation``, ``main.py::train_epoch``, ``utils/utils.py::GSPlugin``;
``docs/methods.md``) where it runs: one encoder forward, per-modality head passes and
optimiser steps, SGD settings from the runner. Discrepancies, as options:

* the official ``GSPlugin`` projects only a parameter named
  ``"module.weight"``, which the head's ``nn.Linear`` does not have, so as
  written its projection never runs: ``projection="none"`` (default)
  reproduces that; ``"replace"`` is the rule the code intends, ``"add"``
  BalanceBenchmark's;
* under torch 1.8.1 the zeroed-but-kept gradients of the inactive encoder
  still receive momentum and weight-decay updates; here the update is masked
  (the issue's and the spec's recommendation), so nothing moves a modality
  outside its own sub-step;
* BalanceBenchmark runs a fresh forward per modality after the previous
  update; identical here for every encoder (an encoder changes only in its
  own sub-step), and the head is re-applied after each update as in both.

Any number of modalities; ``projection`` needs every modality's features to
have the head kernel's input width (the ``shared`` head). The per-modality
forward passes share one trace: with a linear head (partial sums) XLA runs
each encoder's forward and backward once per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import register_method

Array = jax.Array

PROJECTIONS = ("none", "replace", "add")
GATINGS = ("batch_entropy", "sample_entropy", "fixed")


def _path_get(tree: Any, path: str) -> Any:
  node = tree
  for key in path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      here = (sorted(node) if isinstance(node, Mapping)
              else type(node).__name__)
      raise ValueError(
          f"MLA's head_kernel {path!r} is not in the parameters (no key "
          f"{key!r}; keys here: {here}). "
          "Use the shared fusion head (fusion='shared') or set head_kernel.")
    node = node[key]
  return node


def _path_set(tree: Any, path: str, value: Any) -> Any:
  key, _, rest = path.partition("/")
  new = dict(tree)
  new[key] = value if not rest else _path_set(tree[key], rest, value)
  return type(tree)(new) if not isinstance(tree, dict) else new


def projection_update(p: Array, r: Array, alpha: Array) -> Array:
  """``P - k k^T / (alpha + r^T k)`` with ``k = P r``, then ``/ ||.||_F``."""
  k = p @ r
  p = p - jnp.outer(k, k) / (alpha + jnp.dot(r, k))
  return p / jnp.linalg.norm(p)


def projection_alpha(step: Array, batches_per_epoch: int) -> Array:
  """``alpha_t = 0.1^(1 + i / N)``, ``i`` the batch index in its epoch."""
  n = max(int(batches_per_epoch), 1)
  i = (step % n).astype(jnp.float32)
  return 0.1 ** (1.0 + i / n)


def batch_entropy_gates(unimodal: Mapping[str, Array], valid: Array,
                        axis_name: Any = None) -> dict[str, Array]:
  """Official MLA gates: softmax over modalities of minus the batch entropy
  (``p = softmax(z_m)`` over the batch axis; valid rows only)."""
  names = sorted(unimodal)
  ent = []
  for m in names:
    z = jnp.where(valid[:, None], unimodal[m].astype(jnp.float32), -jnp.inf)
    top = jnp.max(z, axis=0)
    if axis_name is not None:
      top = jax.lax.pmax(top, axis_name)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(valid[:, None], jnp.exp(z - top), 0.0)
    total = jnp.sum(e, axis=0)
    if axis_name is not None:
      total = jax.lax.psum(total, axis_name)
    logp = z - top - jnp.log(jnp.maximum(total, 1e-30))
    p = e / jnp.maximum(total, 1e-30)
    h = -jnp.sum(jnp.where(valid[:, None], p * logp, 0.0))
    if axis_name is not None:
      h = jax.lax.psum(h, axis_name)
    ent.append(h)
  g = jax.nn.softmax(-jnp.stack(ent))
  return {m: g[i] for i, m in enumerate(names)}


def grouped_batch_entropy_fusion(unimodal: Mapping[str, Array], valid: Array,
                                 group: int) -> Array:
  """``sum_m g_m z_m`` with one batch-entropy gate per ``group`` consecutive
  rows (:func:`batch_entropy_gates` of each group; padded rows left out).

  The rows of a batch (of a device, under ``pmap``) must be a multiple of
  ``group``; then the groups are those of the whole evaluation split cut in
  order, whatever the evaluation batch size.
  """
  names = sorted(unimodal)
  rows = jnp.shape(valid)[0]
  if rows % group:
    raise ValueError(
        f"MLA's batch-entropy gate is computed per {group} rows (gate_batch) "
        f"but an evaluation batch has {rows} rows (per device): use an "
        f"evaluation batch size that is a multiple of {group} per device, or "
        "set gate_batch.")
  split = lambda x: jnp.reshape(x, (rows // group, group) + x.shape[1:])
  gates = jax.vmap(batch_entropy_gates)({m: split(unimodal[m])
                                         for m in names}, split(valid))
  fused = sum(gates[m][:, None, None] * split(unimodal[m]).astype(jnp.float32)
              for m in names)
  return jnp.reshape(fused, (rows,) + fused.shape[2:])


def sample_entropy_gates(unimodal: Mapping[str, Array]) -> dict[str, Array]:
  """BalanceBenchmark's gates: per row, softmax over modalities of minus the
  entropy of each modality's class distribution; ``{m: [batch]}``."""
  names = sorted(unimodal)
  ent = []
  for m in names:
    logp = jax.nn.log_softmax(unimodal[m].astype(jnp.float32), axis=-1)
    ent.append(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
  g = jax.nn.softmax(-jnp.stack(ent), axis=0)
  return {m: g[i] for i, m in enumerate(names)}


@register_method
@dataclasses.dataclass(frozen=True)
class MLA(Method):
  """MLA (see the module docstring).

  Attributes:
    projection: ``"none"`` (official code as it runs), ``"replace"``
      (``dW <- dW P^T``, what the official code intends) or ``"add"``
      (BalanceBenchmark).
    head_kernel: ``/``-path of the shared head's weight in the parameters
      (``[features, classes]``, Flax layout, so the projection is
      ``P @ kernel_grad``).
    gating: ``"batch_entropy"``, ``"sample_entropy"`` or ``"fixed"``.
    fixed_weights: per-modality weights in sorted-name order for
      ``"fixed"`` (empty: equal).
    batches_per_epoch: ``N`` in ``alpha_t`` (the runner sets it).
    gate_batch: rows that share one ``"batch_entropy"`` gate: the
      evaluation rows are cut, in order, into consecutive groups of this
      many (official: its test loader's batch, 64) and each group gets its
      own gate, so the result does not depend on the evaluation batch size
      (which must be a multiple of it, per device). 0: one gate per
      evaluation batch, whatever its size.
  """
  name: ClassVar[str] = "mla"
  alternating: ClassVar[bool] = True
  needs_features: ClassVar[bool] = True
  projection: str = "none"
  head_kernel: str = "head/classifier/kernel"
  gating: str = "batch_entropy"
  fixed_weights: tuple = ()
  batches_per_epoch: int = 1
  gate_batch: int = 64

  def __post_init__(self):
    super().__post_init__()
    if self.projection not in PROJECTIONS:
      raise ValueError(f"projection must be one of {list(PROJECTIONS)}; got "
                       f"{self.projection!r}.")
    if self.gating not in GATINGS:
      raise ValueError(f"gating must be one of {list(GATINGS)}; got "
                       f"{self.gating!r}.")
    if int(self.batches_per_epoch) < 1:
      raise ValueError("batches_per_epoch must be >= 1; got "
                       f"{self.batches_per_epoch}.")
    if (isinstance(self.gate_batch, bool) or not isinstance(
        self.gate_batch, (int, np.integer)) or self.gate_batch < 0):
      raise ValueError("gate_batch must be an integer >= 0 (0: the whole "
                       f"evaluation batch); got {self.gate_batch!r}.")
    weights = tuple(self.fixed_weights)
    if any(isinstance(w, bool) or not isinstance(w, (int, float, np.number))
           or not np.isfinite(w) or w < 0 for w in weights):
      raise ValueError("fixed_weights must be finite numbers >= 0; got "
                       f"{weights!r}.")

  def init_state(self, modalities):
    if self.gating == "fixed" and self.fixed_weights and (
        len(self.fixed_weights) != len(tuple(modalities))):
      raise ValueError(f"fixed_weights has {len(self.fixed_weights)} "
                       f"entries for {len(tuple(modalities))} modalities "
                       f"{sorted(modalities)}.")
    return {"n": jnp.zeros((), jnp.int32)}

  def initial_state(self, modalities, params):
    state = self.init_state(modalities)
    if self.projection != "none":
      kernel = _path_get(params, self.head_kernel)
      if jnp.ndim(kernel) != 2:
        raise ValueError(f"MLA's head_kernel {self.head_kernel!r} has shape "
                         f"{jnp.shape(kernel)}; a [features, classes] "
                         "kernel is needed.")
      state["P"] = jnp.eye(jnp.shape(kernel)[0], dtype=jnp.float32)
    return state

  def substep_gradients(self, modality: str, grads: Any, features: Array,
                        rows: Array, state: Any, step: Array,
                        axis_name: Any = None) -> tuple[Any, Any]:
    """Sub-step ``modality``'s gradient (projected head weight) and state.

    ``features`` are the modality's training-mode features ``[batch, d]``
    (None if the model does not return them), ``rows`` the rows that count.
    """
    n = state["n"]
    new = {**state, "n": n + 1}
    if self.projection == "none":
      return grads, new
    if features is None:
      raise ValueError("MLA's projection reads the encoders' features: build "
                       "apply_fn with arl_jax.models.make_apply_fn(model, "
                       "with_features=True).")
    p = state["P"]
    h = jnp.reshape(features, (jnp.shape(features)[0], -1)).astype(jnp.float32)
    if h.shape[-1] != p.shape[0]:
      raise ValueError(
          f"modality {modality!r} has {h.shape[-1]} features but the head "
          f"kernel {self.head_kernel!r} takes {p.shape[0]}: the projection "
          "needs the shared head (fusion='shared').")
    w = rows.astype(jnp.float32)
    total, count = jnp.tensordot(w, h, axes=1), jnp.sum(w)
    if axis_name is not None:
      total, count = jax.lax.psum((total, count), axis_name)
    r = total / jnp.maximum(count, 1.0)
    first = n == 0
    p_new = jnp.where(first, p, projection_update(
        p, r, projection_alpha(step, self.batches_per_epoch)))
    g = _path_get(grads, self.head_kernel)
    projected = (p_new @ g.astype(jnp.float32)).astype(g.dtype)
    if self.projection == "add":
      projected = g + projected
    g = jnp.where(first, g, projected)
    new["P"] = p_new
    return _path_set(grads, self.head_kernel, g), new

  def modulation(self, stats):
    return Modulation({m: jnp.zeros((), jnp.float32) for m in stats},
                      {m: jnp.ones((), jnp.float32) for m in stats}, None)

  def eval_logits(self, fused: Array, unimodal: Mapping[str, Array],
                  valid: Array, axis_name: Any = None) -> Array:
    """The gated fusion ``sum_m g_m z_m`` (``fused`` is not used)."""
    del fused
    names = sorted(unimodal)
    if self.gating == "batch_entropy":
      if not self.gate_batch:
        g = batch_entropy_gates(unimodal, valid, axis_name)
        return sum(g[m] * unimodal[m].astype(jnp.float32) for m in names)
      return grouped_batch_entropy_fusion(unimodal, valid, self.gate_batch)
    if self.gating == "sample_entropy":
      g = sample_entropy_gates(unimodal)
      return sum(g[m][:, None] * unimodal[m].astype(jnp.float32)
                 for m in names)
    weights = (tuple(float(w) for w in self.fixed_weights)
               or (1.0 / len(names),) * len(names))
    return sum(w * unimodal[m].astype(jnp.float32)
               for w, m in zip(weights, names))
