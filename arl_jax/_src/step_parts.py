"""The pieces of the train step, each a pure function; public API:
:mod:`arl_jax.step_parts`.

:func:`arl_jax.make_train_step` validates its arguments once and composes
these per step::

  in_warmup = modulation_off(method, state.step, warmup_steps, steps_per_epoch)
  forward_and_loss(...)            # forward pass, loss (Eq. 22), gradients,
    or accumulated_forward_and_loss  # batch sums (Eqs. 4, 17 read them)
  heldout_statistics(...)          # optional held-out rows, no gradient
  modulate(...)                    # the method's coefficients -> scales
  apply_update(...)                # tx.update with the scales; skip if NaN
  step_metrics(...)                # what the step reports

or, for a method that alternates per-modality updates (MLA),
:func:`alternating_update` in place of the middle four. A user's own loop
can call the same pieces (e.g. :func:`forward_and_loss` and
:func:`modulate`, then its own update); each takes a :class:`StepSpec`, the
step's fixed ingredients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arl_jax._src import losses
from arl_jax._src import statistics as stats_lib
from arl_jax._src import validation as _validation
from arl_jax._src.labels import label_modalities
from arl_jax._src.method_protocol import LossContext
from arl_jax._src.method_protocol import Method
from arl_jax._src.method_protocol import Modulation

Array = jax.Array
ApplyFn = Callable[..., tuple[tuple[Array, Mapping[str, Array]], Any]]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The fixed ingredients of a train step.

  Attributes:
    apply_fn: the model (``arl_jax.ApplyFn`` form).
    tx: the optimiser, containing :func:`arl_jax.scale_by_modality`.
    method: the balancing method.
    axis_name: the device axis under ``pmap`` (None otherwise).
    skip_nonfinite_updates: keep the state when the loss or a gradient is
      not finite.
  """
  apply_fn: ApplyFn
  tx: optax.GradientTransformation
  method: Method
  axis_name: Any = None
  skip_nonfinite_updates: bool = True

  @property
  def custom_loss(self) -> bool:
    """Whether the method overrides :meth:`Method.loss`."""
    return type(self.method).loss is not Method.loss


class BatchSums(NamedTuple):
  """The sums a step reads its statistics from (add over micro-batches and
  devices): per-modality :class:`arl_jax.ModalityStatistics`, the fused
  prediction's, and the number of rows with a label outside ``[0, C)``."""
  modalities: dict[str, Any]
  fused: Any
  invalid: Any


class Outputs(NamedTuple):
  """One training-mode forward pass, with the rows that count."""
  fused: Any
  unimodal: Any
  features: Any          # {m: features} when apply_fn returns them, or None
  model_state: Any       # the new mutable collections
  rows: Any              # bool [batch]: in the batch and with a valid label
  labels: Any            # clipped to [0, C) (safe to gather)
  invalid: Any           # rows in the batch with an out-of-range label


# --------------------------------------------------------------------------
# Batches and model outputs.


def unpack_batch(batch: Mapping[str, Any]):
  """``(inputs, labels, mask)`` of a batch, its keys and shapes checked."""
  if not isinstance(batch, Mapping) or "inputs" not in batch or (
      "labels" not in batch):
    raise ValueError("a batch must be a mapping with 'inputs' "
                     "({modality: array}) and 'labels' ([batch] int); got "
                     f"{type(batch).__name__} with keys "
                     f"{sorted(batch) if isinstance(batch, Mapping) else '-'}.")
  unknown = set(batch) - {"inputs", "labels", "mask", "heldout"}
  if unknown:
    raise ValueError(f"unknown batch keys {sorted(unknown)}; a batch has "
                     "'inputs', 'labels' and optionally 'mask' and "
                     "'heldout'.")
  labels, mask = batch["labels"], batch.get("mask")
  if np.ndim(labels) != 1:
    raise ValueError(f"batch['labels'] must have shape [batch]; got shape "
                     f"{np.shape(labels)}.")
  if mask is not None and np.shape(mask) != np.shape(labels):
    # (A [batch, 1] mask would broadcast against the labels to [batch, batch].)
    raise ValueError(f"batch['mask'] must have shape [batch] = "
                     f"{np.shape(labels)}, like the labels; got shape "
                     f"{np.shape(mask)}.")
  return batch["inputs"], labels, mask


def zero_masked_rows(inputs: Any, mask: Any) -> Any:
  """The inputs with the rows whose ``mask`` is False set to 0.

  A masked row is left out of the loss, but a NaN in its input would still
  reach the gradients (its zero cotangent times a NaN Jacobian is NaN) and
  make the step skip its update; zeroing it first keeps it out entirely.
  """
  if mask is None:
    return inputs

  def zero(x):
    if jnp.ndim(x) == 0 or jnp.shape(x)[0] != jnp.shape(mask)[0]:
      return x
    keep = jnp.reshape(mask, (-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(keep, x, jnp.zeros((), jnp.result_type(x)))

  return jax.tree.map(zero, inputs)


def label_mask(labels: Array, mask: Array | None, num_classes: int
               ) -> tuple[Array, Array, Array]:
  """Rows that train: in the batch and with a label in [0, C).

  Returns ``(rows, safe_labels, num_invalid)``: rows with an out-of-range
  label are left out of every loss and statistic (``safe_labels`` clips them
  so that no gather reads out of range) and counted in ``num_invalid``.
  """
  in_batch = (jnp.ones(jnp.shape(labels), bool) if mask is None
              else jnp.asarray(mask, bool))
  ok = (labels >= 0) & (labels < num_classes)
  invalid = jnp.sum((in_batch & ~ok).astype(jnp.float32))
  return in_batch & ok, jnp.clip(labels, 0, num_classes - 1), invalid


def features_of(outputs: Any):
  """The encoders' ``{m: features}`` when ``apply_fn`` returned them."""
  if isinstance(outputs, (tuple, list)) and len(outputs) == 3:
    return outputs[2]
  return None


def check_outputs(outputs: Any, inputs: Mapping[str, Any]):
  """``(fused, unimodal, names)`` of ``apply_fn``'s outputs, checked."""
  if isinstance(outputs, (tuple, list)) and len(outputs) == 3:
    outputs = outputs[:2]       # (fused, unimodal, features)
  try:
    fused, unimodal = outputs
  except (TypeError, ValueError):
    raise ValueError("apply_fn must return ((fused_logits, {modality: "
                     "unimodal_logits}[, {modality: features}]), "
                     "new_model_state).") from None
  names = _validation.modality_names(unimodal, "unimodal logits")
  if isinstance(inputs, Mapping):
    _validation.check_same_modalities(tuple(inputs), unimodal,
                                      "the model's unimodal logits")
  return fused, unimodal, names


def train_outputs(apply_fn: ApplyFn, params, model_state, inputs, labels,
                  mask, rng) -> Outputs:
  """The model in training mode on a batch, and the rows that count."""
  outputs, new_model_state = apply_fn(params, model_state, inputs,
                                      train=True, rng=rng)
  fused, unimodal, _ = check_outputs(outputs, inputs)
  rows, safe, invalid = label_mask(labels, mask, jnp.shape(fused)[-1])
  return Outputs(fused, unimodal, features_of(outputs), new_model_state,
                 rows, safe, invalid)


def batch_sums(fused, unimodal, labels, rows, invalid) -> BatchSums:
  """The statistics' sums of one batch (no gradient flows through them)."""
  return BatchSums(stats_lib.modality_statistics(unimodal, labels, rows),
                   stats_lib.prediction_statistics(fused, labels, rows),
                   invalid)


def global_share(axis_name: Any) -> Callable[[Array], Array]:
  """``weight_of(count)``: the share of the global batch's rows held on
  this device (1 without a device axis), the weight of its mean loss."""
  def weight_of(count):
    if axis_name is None:
      return jnp.float32(1.0)
    return count / jnp.maximum(jax.lax.psum(count, axis_name), 1.0)
  return weight_of


# --------------------------------------------------------------------------
# Forward pass, loss and gradients.


def _split_model(apply_fn: ApplyFn, params, model_state) -> dict:
  """``encode`` / ``classify`` closures when ``apply_fn`` carries them."""
  encode = getattr(apply_fn, "encode", None)
  classify = getattr(apply_fn, "classify", None)
  if encode is None or classify is None:
    return {}
  return {"encode": lambda x: encode(params, model_state, x),
          "classify": lambda f: classify(params, f)}


def forward_and_loss(spec: StepSpec, params, model_state, inputs, labels,
                     mask, rng, gamma, weight_of, method_state=(),
                     active=True):
  """Loss (times ``weight_of(rows)``), gradients, batch sums, the new model
  state and what the method's loss returned besides the loss (``{}`` by
  default).

  The loss is Eq. 22, ``CE(p_f, y) + gamma * sum_m CE(p_m, y)``, or the
  method's own (:meth:`Method.loss`); a method with
  ``per_loss_gradients`` gets one gradient per loss term instead
  (:func:`per_loss_gradients`), a dict keyed as its ``loss_cotangents``.

  Returns:
    ``(loss, grads, BatchSums, new_model_state, method_aux)``.
  """
  method, apply_fn = spec.method, spec.apply_fn
  if method.per_loss_gradients:
    return per_loss_gradients(spec, params, model_state, inputs, labels, mask,
                              rng, gamma, weight_of)

  def loss_fn(params):
    out = train_outputs(apply_fn, params, model_state, inputs, labels, mask,
                        rng)
    if spec.custom_loss:
      def forward(x):     # the same parameters, evaluation mode
        outs, _ = apply_fn(params, model_state, x, train=False, rng=rng)
        return check_outputs(outs, x)[:2]
      loss, method_aux = method.loss(LossContext(
          fused=out.fused, unimodal=out.unimodal, labels=out.labels,
          rows=out.rows, gamma=gamma, active=active, state=method_state,
          inputs=inputs, forward=forward, axis_name=spec.axis_name,
          features=out.features,
          **_split_model(apply_fn, params, model_state)))
    else:
      loss = losses.arl_loss(out.fused, out.unimodal, out.labels, gamma,
                             mask=out.rows)
      method_aux = {}
    count = jnp.sum(out.rows.astype(jnp.float32))
    return loss * weight_of(count), (out, method_aux)

  (loss, (out, method_aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  sums = batch_sums(out.fused, out.unimodal, out.labels, out.rows,
                    out.invalid)
  return loss, grads, sums, out.model_state, method_aux


def per_loss_gradients(spec: StepSpec, params, model_state, inputs, labels,
                       mask, rng, gamma, weight_of):
  """One gradient per combination of the loss terms, from one forward pass.

  The ``K + 1`` terms ``[CE(p_f), CE(p_m1), ...]`` come from one forward
  pass; their gradients, one per entry of ``method.loss_cotangents`` (each
  term alone by default), from one ``jax.vjp`` whose cotangents are pulled
  back together (MMPareto). Same returns as :func:`forward_and_loss`, with
  ``grads`` a dict of gradient trees.
  """
  def terms_fn(params):
    out = train_outputs(spec.apply_fn, params, model_state, inputs, labels,
                        mask, rng)
    terms = losses.loss_terms(out.fused, out.unimodal, out.labels,
                              mask=out.rows)
    count = jnp.sum(out.rows.astype(jnp.float32))
    return terms * weight_of(count), out

  terms, pull_back, out = jax.vjp(terms_fn, params, has_aux=True)
  names = _validation.modality_names(out.unimodal, "unimodal logits")
  # The method's combinations of the loss terms (default: each term).
  combos = spec.method.loss_cotangents(names)
  (stacked,) = jax.vmap(pull_back)(jnp.asarray(
      [combos[k] for k in combos], terms.dtype))
  grads = {key: jax.tree.map(lambda g, i=i: g[i], stacked)
           for i, key in enumerate(combos)}
  loss = terms[0] + gamma * jnp.sum(terms[1:])
  sums = batch_sums(out.fused, out.unimodal, out.labels, out.rows,
                    out.invalid)
  return loss, grads, sums, out.model_state, {}


def micro_batches(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
  """``[n * b, ...]`` leaves -> ``[n, b, ...]`` (rows k*b .. k*b+b-1 in micro k)."""
  def split(x):
    size = jnp.shape(x)[0]
    if size % n:
      raise ValueError(f"a batch of {size} rows does not split into "
                       f"accumulation_steps={n} equal micro-batches.")
    return jnp.reshape(x, (n, size // n) + tuple(jnp.shape(x)[1:]))
  return jax.tree.map(split, dict(batch))


def accumulated_forward_and_loss(spec: StepSpec, params, model_state, inputs,
                                 labels, mask, rng, gamma, num_micro: int):
  """:func:`forward_and_loss` over ``num_micro`` consecutive micro-batches
  (``lax.scan``: the memory of one), their losses, gradients and sums added
  (each loss weighted by its row count), then divided once by the rows of
  the whole (global) batch. Same returns, ``method_aux`` empty."""
  micro = micro_batches({"inputs": inputs, "labels": labels,
                         **({} if mask is None else {"mask": mask})},
                        num_micro)

  def one(carry, xs):
    k, b = xs
    model_state, acc = carry
    loss, grads, sums, model_state, _ = forward_and_loss(
        spec, params, model_state, b["inputs"], b["labels"], b.get("mask"),
        jax.random.fold_in(rng, 2 + k), gamma, lambda count: count)
    add = (loss, grads, sums)
    acc = add if acc is None else jax.tree.map(jnp.add, acc, add)
    return (model_state, acc), None

  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: one((model_state, None),
                  (0, jax.tree.map(lambda x: x[0], micro)))[0][1]))
  (new_model_state, (loss, grads, sums)), _ = jax.lax.scan(
      one, (model_state, zero), (jnp.arange(num_micro), micro))
  rows = sums.fused.count + sums.fused.num_nonfinite
  if spec.axis_name is not None:
    rows = jax.lax.psum(rows, spec.axis_name)
  loss, grads = jax.tree.map(lambda x: x / jnp.maximum(rows, 1.0),
                             (loss, grads))
  return loss, grads, sums, new_model_state, {}


def heldout_statistics(apply_fn: ApplyFn, params, model_state,
                       heldout: Mapping[str, Any], rng):
  """Per-modality statistics of held-out rows: a separate forward pass in
  evaluation mode, outside the differentiated function (the gradients are
  those without it)."""
  h_inputs, h_labels, h_mask = unpack_batch(heldout)
  h_inputs = zero_masked_rows(h_inputs, h_mask)
  outputs, _ = apply_fn(params, model_state, h_inputs, train=False, rng=rng)
  h_fused, h_unimodal, _ = check_outputs(outputs, h_inputs)
  rows, safe, _ = label_mask(h_labels, h_mask, jnp.shape(h_fused)[-1])
  return stats_lib.modality_statistics(h_unimodal, safe, rows)


# --------------------------------------------------------------------------
# Modulation and update.


def modulation_off(method: Method, step: Array, warmup_steps,
                   steps_per_epoch: int | None) -> Array:
  """Whether the step runs unmodulated: in warm-up (``step <
  warmup_steps``), or, for a method with an epoch window, outside it."""
  window = method.modulation_window()
  if window is None:
    return step < warmup_steps
  epoch = step // steps_per_epoch
  return (epoch < window[0]) | (epoch > window[1])


def modulate(method: Method, stats, heldout, method_state, in_warmup):
  """The method's coefficients and the scales applied this step.

  Returns ``(modulation, method_state, scales, extra)``: ``scales`` are the
  method's, 1 while ``in_warmup``; ``extra`` holds the keyword arguments of
  ``tx.update`` (``modality_scales``, and ``modality_noise`` for a method
  that adds gradient noise, 0 in warm-up).
  """
  modulation, method_state = method.modulate(stats, heldout, method_state)
  scales = {m: jnp.where(in_warmup, 1.0, v).astype(jnp.float32)
            for m, v in modulation.scales.items()}
  extra = {"modality_scales": scales}
  if modulation.noise is not None:
    extra["modality_noise"] = {m: jnp.where(in_warmup, 0.0, v)
                               for m, v in modulation.noise.items()}
  return modulation, method_state, scales, extra


def apply_update(spec: StepSpec, state, loss, grads, update_kwargs,
                 new_model_state, method_state):
  """``tx.update`` of the gradients with the method's scales, or, when the
  loss or a gradient is not finite (and ``spec.skip_nonfinite_updates``),
  the state as it was.

  Returns ``(params, opt_state, model_state, method_state, ok, grad_norm)``.
  """
  grad_norm = optax.tree.norm(grads)
  # One reduction instead of one per leaf: the norm is finite iff every
  # gradient entry is (barring a norm that overflows, i.e. > 3e38).
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def take_step():
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params,
                                        **update_kwargs)
    return (optax.apply_updates(state.params, updates), opt_state,
            new_model_state, method_state)

  if spec.skip_nonfinite_updates:
    # A conditional, not a select per leaf between the new and the old
    # value: with the state donated, the selects made XLA copy every
    # parameter and optimiser leaf first (each new value needs the old
    # one after it is overwritten), and the skipped branch does no
    # optimiser work.
    params, opt_state, new_model_state, method_state = jax.lax.cond(
        ok, take_step, lambda: (state.params, state.opt_state,
                                state.model_state, state.method_state))
  else:
    params, opt_state, new_model_state, method_state = take_step()
  return params, opt_state, new_model_state, method_state, ok, grad_norm


def alternating_update(spec: StepSpec, state, inputs, labels, mask, rng,
                       gamma, in_warmup, weight_of):
  """One masked optimiser update per modality (:attr:`Method.alternating`).

  Sub-step ``m`` differentiates ``method.substep_loss(m, ...)`` at the
  parameters left by the previous sub-steps, lets the method modify the
  gradient, and applies ``tx`` to encoder ``m`` and the shared parameters
  only: every other leaf of the parameters and of the optimiser state
  keeps its value, and the optimiser's other state (step counts) is taken
  from the last sub-step alone, so it advances once per step. Statistics
  and metrics come from the first sub-step's forward pass (the parameters
  before the step).

  Returns ``(loss, BatchSums, model_state, params, opt_state, method_state,
  ok, grad_norm)``.
  """
  method, tx, axis_name = spec.method, spec.tx, spec.axis_name
  names = tuple(sorted(inputs))
  order = method.substep_order(names)
  param_labels = label_modalities(names)(state.params)
  model_labels = label_modalities(names)(state.model_state)
  param_struct = jax.tree.structure(state.params)
  is_param_tree = lambda x: jax.tree.structure(x) == param_struct
  ones = {m: jnp.ones((), jnp.float32) for m in names}
  params, opt_state, method_state = (state.params, state.opt_state,
                                     state.method_state)
  model_states, first, loss_total, sq_norm = {}, None, 0.0, 0.0
  all_ok = jnp.ones((), bool)
  for i, m in enumerate(order):
    last = i == len(order) - 1

    def loss_fn(p, m=m, method_state=method_state):
      out = train_outputs(spec.apply_fn, p, state.model_state, inputs,
                          labels, mask, rng)
      loss = method.substep_loss(m, LossContext(
          fused=out.fused, unimodal=out.unimodal, labels=out.labels,
          rows=out.rows, gamma=gamma, active=~in_warmup, state=method_state,
          inputs=inputs, forward=None, axis_name=axis_name,
          features=out.features))
      count = jnp.sum(out.rows.astype(jnp.float32))
      return loss * weight_of(count), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    features = None if out.features is None else out.features[m]
    if first is None:
      first = out
    if axis_name is not None:
      loss, grads = jax.lax.psum((loss, grads), axis_name)
    grads, new_method_state = method.substep_gradients(
        m, grads, features, out.rows, method_state, state.step, axis_name)
    updates, new_opt_state = tx.update(grads, opt_state, params,
                                       modality_scales=ones)
    new_params = optax.apply_updates(params, updates)
    norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(norm)
    if not spec.skip_nonfinite_updates:
      ok = jnp.ones((), bool)
    moves = jax.tree.map(lambda label, m=m: label in (m, "shared"),
                         param_labels)

    def masked(new, old, ok=ok, moves=moves):
      return jax.tree.map(lambda k, n, o: jnp.where(ok, n, o) if k else o,
                          moves, new, old)

    params = masked(new_params, params)
    opt_state = jax.tree.map(
        lambda new, old, last=last, ok=ok, masked=masked: (
            masked(new, old) if is_param_tree(new) else
            (jnp.where(ok, new, old) if last else old)),
        new_opt_state, opt_state, is_leaf=is_param_tree)
    method_state = jax.tree.map(lambda n, o, ok=ok: jnp.where(ok, n, o),
                                new_method_state, method_state)
    model_states[m] = out.model_state
    loss_total = loss_total + loss
    sq_norm = sq_norm + norm ** 2
    all_ok = all_ok & ok
  # Each encoder's batch statistics from its own sub-step; the rest from
  # the last one.
  new_model_state = jax.tree.map(
      lambda label, *leaves: leaves[order.index(label)] if label in order
      else leaves[-1], model_labels, *(model_states[m] for m in order))
  if axis_name is not None:
    new_model_state = jax.lax.pmean(new_model_state, axis_name)
  sums = batch_sums(first.fused, first.unimodal, first.labels, first.rows,
                    first.invalid)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return (loss_total, sums, new_model_state, params, opt_state,
          method_state, all_ok, jnp.sqrt(sq_norm))


# --------------------------------------------------------------------------
# Metrics.


def per_modality_metrics(stats, modulation: Modulation, scales
                         ) -> dict[str, Any]:
  """The train step's per-modality metrics, ``{modality: value}`` each.

  ``q``, ``s`` and ``a`` are the paper's symbols, kept as the keys (the
  committed results and the comparison read them): ``q`` the unimodal
  inverse variance ``q_m`` (Eq. 17 on the batch, or the method's own
  estimate, ``q_estimate``, where it has one), ``s`` the optimisation
  dependency ``s_m`` (Eq. 4), ``a`` the method's coefficient ``a_m`` (ARL:
  Eq. 18); ``scale`` the gradient scale applied this step (1 in warm-up).
  """
  count = {m: jnp.maximum(s.count, 1.0) for m, s in stats.items()}
  return {
      "q": modulation.diagnostics.get(
          "q_estimate", stats_lib.inverse_variance_from_statistics(stats)),
      "s": stats_lib.dependency_from_statistics(stats),
      "a": dict(modulation.coefficients),
      "scale": dict(scales),
      "unimodal_loss": {m: s.loss_sum / count[m] for m, s in stats.items()},
      "unimodal_accuracy": {m: s.correct / count[m] for m, s in stats.items()},
      "nonfinite_rows": {m: s.num_nonfinite for m, s in stats.items()},
  }


def step_metrics(loss, sums: BatchSums, gamma, in_warmup, grad_norm, ok,
                 modulation: Modulation, scales, heldout=None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The step's metrics as plain ``{name: value}`` / ``{name: {m: value}}``
  (see :func:`arl_jax.make_train_step`); ``extra``: further scalars (the
  method's gradient-combination diagnostics)."""
  stats, fused_stats = sums.modalities, sums.fused
  diagnostics = {k: v for k, v in modulation.diagnostics.items()
                 if k != "q_estimate"}
  metrics = {
      "loss": loss,
      "fused_loss": fused_stats.loss_sum / jnp.maximum(fused_stats.count, 1),
      "accuracy": fused_stats.correct / jnp.maximum(fused_stats.count, 1),
      "gamma": gamma,
      "warmup": in_warmup.astype(jnp.float32),
      "grad_norm": grad_norm,
      "update_skipped": (~ok).astype(jnp.float32),
      "invalid_labels": sums.invalid,
      **diagnostics,
      **dict(extra or {}),
      **per_modality_metrics(stats, modulation, scales),
  }
  if heldout is not None:
    metrics["heldout_unimodal_accuracy"] = {
        m: s.correct / jnp.maximum(s.count, 1.0) for m, s in heldout.items()}
  return metrics
