"""One pure, jittable ARL training step ``(state, batch) -> (state, metrics)``.

The model is any function with the signature of :data:`ApplyFn`::

  apply_fn(params, model_state, inputs, *, train, rng)
      -> ((fused_logits, {modality: unimodal_logits}), new_model_state)

where ``params`` is a pytree whose encoder subtrees are labelled by modality
for :func:`arl_jax.scale_by_modality`, ``model_state`` holds mutable
collections (BatchNorm statistics; ``{}`` if none) and ``inputs`` is
``{modality: array}``. :func:`arl_jax.fused_and_unimodal_logits` turns a
fusion head into the two outputs. The step runs the model once, and computes
the loss (Eq. 22), the statistics (Eqs. 4, 17), the coefficients (Eq. 18) and
the scaled update inside one computation: nothing goes to the host.

How the step is parallelised (``jax.jit`` with shardings, ``pmap``) is a
wrapper around this function, not a copy of it.
"""

from __future__ import annotations

import concurrent.futures
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from arl_jax._src import fusion_weighting as fusion_lib
from arl_jax._src import losses
from arl_jax._src import optimizer_checks
from arl_jax._src import statistics as stats_lib
from arl_jax._src import validation as _validation
from arl_jax._src.labels import label_modalities
from arl_jax._src.modality_values import stack_per_modality
from arl_jax._src.transforms import ScaleByModalityState
from arl_jax.methods import Method
from arl_jax.methods.base import LossContext

Array = jax.Array
ApplyFn = Callable[..., tuple[tuple[Array, Mapping[str, Array]], Any]]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; a pytree (checkpoint it whole)."""
  step: Array          # int32 number of steps taken (drives the warm-up)
  params: Any
  opt_state: Any
  model_state: Any     # mutable model collections, e.g. {"batch_stats": ...}
  rng: Array           # base key; step t uses fold_in(rng, t)
  method_state: Any = ()   # the method's own state (e.g. ARL's EMA), or ()

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation,
             rng: Array, model_state: Any = None, method: Method | None = None,
             modalities=None) -> TrainState:
    """A fresh state; give ``method`` and ``modalities`` if it keeps state."""
    method_state = ()
    if method is not None:
      if modalities is None:
        raise ValueError("TrainState.create(method=...) needs modalities=...")
      method_state = method.initial_state(tuple(modalities), params)
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params),
               model_state={} if model_state is None else model_state,
               rng=rng, method_state=method_state)


def _unpack_batch(batch: Mapping[str, Any]):
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


def _zero_masked_rows(inputs: Any, mask: Any) -> Any:
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


def _check_method_state(method: Method, state: Any, modalities) -> None:
  """A method that keeps state needs it in the TrainState (trace time only)."""
  if jax.tree.leaves(state.method_state):
    return
  expected = jax.eval_shape(
      lambda p: method.initial_state(tuple(sorted(modalities)), p),
      state.params)
  if jax.tree.leaves(expected):
    raise ValueError(
        f"method {type(method).__name__} keeps state, but the TrainState has "
        "none: create it with TrainState.create(..., method=method, "
        "modalities=[...]) (or method_state=method.init_state(modalities)).")


def _has_scale_by_modality(opt_state: Any) -> bool:
  return any(isinstance(x, ScaleByModalityState) for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ScaleByModalityState)))


def _features_of(outputs: Any):
  """The encoders' ``{m: features}`` when ``apply_fn`` returned them."""
  if isinstance(outputs, (tuple, list)) and len(outputs) == 3:
    return outputs[2]
  return None


def _check_outputs(outputs: Any, inputs: Mapping[str, Any]):
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


def _renamed(preprocess, batch_transform, where: str):
  """``preprocess``, or its deprecated name ``batch_transform`` (a warning)."""
  if batch_transform is None:
    return preprocess
  if preprocess is not None:
    raise TypeError(f"{where}: pass preprocess only (batch_transform is its "
                    "deprecated name).")
  warnings.warn(f"{where}(batch_transform=...) is deprecated: use "
                "preprocess=...", DeprecationWarning, stacklevel=3)
  return batch_transform


def _per_modality_metrics(stats, modulation, scales) -> dict[str, Any]:
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


def _label_mask(labels: Array, mask: Array | None, num_classes: int
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


def _micro_batches(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
  """``[n * b, ...]`` leaves -> ``[n, b, ...]`` (rows k*b .. k*b+b-1 in micro k)."""
  def split(x):
    size = jnp.shape(x)[0]
    if size % n:
      raise ValueError(f"a batch of {size} rows does not split into "
                       f"accumulation_steps={n} equal micro-batches.")
    return jnp.reshape(x, (n, size // n) + tuple(jnp.shape(x)[1:]))
  return jax.tree.map(split, dict(batch))


def _check_int(value: Any, what: str, minimum: int) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  if np.ndim(value) != 0 or int(value) != value or value < minimum:
    raise ValueError(f"{what} must be an integer >= {minimum}; got {value!r}.")


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation,
                    method: Method, *, warmup_steps: int | Array = 0,
                    skip_nonfinite_updates: bool = True,
                    axis_name: Any = None,
                    preprocess: Callable | None = None,
                    accumulation_steps: int = 1,
                    check_tx: bool = True,
                    normalize_loss_weights: bool = False,
                    batch_transform: Callable | None = None,
                    steps_per_epoch: int | None = None,
                    ) -> Callable[[TrainState, Mapping[str, Any]],
                                  tuple[TrainState, dict[str, Any]]]:
  """Builds the training step of a balancing ``method`` (ARL by default use).

  Per step ``t`` (all inside one traced computation):

  1. run the model once: fused and unimodal logits;
  2. loss ``L = CE(p_f, y) + gamma_t * sum_m CE(p_m, y)`` (Eq. 22) and its
     gradients;
  3. the method's coefficients from the batch sums of the unimodal
     predictions (for ARL: Eq. 17, Eq. 4, Eq. 18), without gradient;
  4. ``tx.update(grads, ..., modality_scales=scales_t)``, ``tx`` containing
     :func:`arl_jax.scale_by_modality` where its scales act (see
     :func:`arl_jax.with_modality_scales`).

  Warm-up, driven by ``state.step`` (no recompilation): while ``t <
  warmup_steps`` the scales are 1, no noise is added and ``gamma_t =
  method.warmup_gamma`` (1 for ARL: "no modulation, unimodal weight 1");
  afterwards ``gamma_t = method.gamma`` and the method's scales apply. The
  coefficients are computed and reported throughout.

  A method with an epoch window of its own (``method.modulation_window()``,
  OGM-GE, AGM and PMR as in their official code) replaces the warm-up by
  it: the step of epoch ``e = t // steps_per_epoch`` runs as in warm-up
  unless ``first <= e <= last``. It needs ``steps_per_epoch`` and
  ``warmup_steps=0``.

  Bad rows never train: rows with ``mask`` False, and rows whose label is
  outside ``[0, C)`` (counted in ``metrics["invalid_labels"]``; eagerly the
  public functions raise instead, but inside ``jit`` labels are not
  concrete), are left out of the loss, the gradients and the statistics.
  Rows with a NaN/Inf unimodal logit are left out of the statistics, so
  coefficients stay finite (neutral if a modality has no finite row). If the
  loss or any gradient is not finite and ``skip_nonfinite_updates`` is True,
  parameters, optimiser and model state are kept as they were,
  ``metrics["update_skipped"]`` is 1 and the step counter still advances.

  Gradient accumulation (``accumulation_steps=n``): the batch's rows are
  split into ``n`` consecutive micro-batches run one after the other
  (``lax.scan``: the memory of one micro-batch), their gradients and
  statistics (sums) are added, and one update is made with the coefficients
  of the *whole* batch, equal to one step on the full batch up to float
  rounding for models without batch statistics (BatchNorm normalises each
  micro-batch by its own statistics; dropout keys differ per micro-batch).
  Do not wrap the chain in ``optax.MultiSteps`` instead: it would apply the
  last micro-batch's scales to the mean gradient and see only that
  micro-batch's statistics.

  Args:
    apply_fn: the model, see :data:`ApplyFn`.
    tx: the optimiser, containing :func:`arl_jax.scale_by_modality` (best
      built with :func:`arl_jax.with_modality_scales`).
    method: an :class:`arl_jax.methods.Method` (``ARL(...)``, ``OGMGE(...)``).
    warmup_steps: number of initial steps without modulation (>= 0).
    skip_nonfinite_updates: see above.
    axis_name: set when the step runs per device under ``jax.pmap`` (or
      ``shard_map``) with that axis name: the loss is normalised by the
      global number of examples and the gradients, statistics and metrics
      are summed over the axis, so every device applies the same
      coefficients and the result is that of the global batch. BatchNorm
      running statistics are averaged over the axis. Leave ``None`` for a
      single device and for ``jax.jit`` with sharded inputs, where XLA
      partitions the global-batch computation itself
      (:mod:`arl_jax.parallel`).
    preprocess: optional ``(batch, rng) -> batch`` traced into the step
      before anything else, e.g. ``FrameAugmentation().train`` (crop, flip
      and resize on the device); its key is ``fold_in(step key, 1)`` (with a
      device axis, different on every device). The batch it receives may
      carry extra keys (``frame_hw``) as long as it returns a plain batch.
    accumulation_steps: micro-batches per update (>= 1), see above.
    check_tx: when the step is first traced, probe ``tx`` on stand-ins of the
      parameters (:func:`arl_jax.optimizer_checks.scales_take_effect`) and
      raise a ValueError if the modality scales provably have no effect
      (e.g. ``scale_by_modality`` before Adam). False skips the probe.
    normalize_loss_weights: divide the loss and its gradients by the sum
      of the loss weights, ``1 + gamma_t K``: the terms keep their relative
      weights (Eq. 22's gamma) but the step size no longer depends on gamma.
      Without it the gradient of Eq. 22 grows by ``(1 + gamma K) / (1 +
      warmup_gamma K)`` (3x for ARL at K = 2) the step warm-up ends, which
      at a learning rate tuned for plain training pushes SGD past its
      stability limit: the loss jumps an order of magnitude and oscillates
      without becoming NaN (gradient clipping keeps it finite), and test
      accuracy collapses late (README, "The late collapse"). Not for
      methods with their own update loop (``alternating``: MLA).
    batch_transform: deprecated name of ``preprocess``.
    steps_per_epoch: training steps per epoch, for a method with an epoch
      window (ignored otherwise).

  Returns:
    ``train_step(state, batch) -> (state, metrics)``; ``batch`` is
    ``{"inputs": {modality: x}, "labels": y, "mask": optional bool [batch]}``.
    ``metrics`` holds scalars ``loss``, ``fused_loss``, ``accuracy``,
    ``gamma``, ``warmup`` (1 where the modulation is off: warm-up, or
    outside the method's window), ``grad_norm``, ``update_skipped``,
    ``invalid_labels``, the method's own diagnostics (ARL:
    ``invalid_temperature``) and per-modality mappings ``q``, ``s``, ``a``,
    ``scale``, ``unimodal_loss``, ``unimodal_accuracy``, ``nonfinite_rows``
    (the paper's symbols: ``q`` the inverse-variance estimate, ``s`` the
    optimisation dependency, ``a`` the method's coefficient; see
    ``_per_modality_metrics``). Each per-modality mapping is an
    :class:`arl_jax.ModalityValues`: read it as a dict, stored as one array
    over the sorted modalities (one output of the step per metric);
    :func:`arl_jax.modality_values.as_dicts` turns the metrics into plain
    dicts.
  """
  preprocess = _renamed(preprocess, batch_transform, "make_train_step")
  _check_int(warmup_steps, "warmup_steps", 0)
  _check_int(accumulation_steps, "accumulation_steps", 1)
  window = method.modulation_window()
  if window is not None:
    if steps_per_epoch is None:
      raise ValueError(
          f"{type(method).__name__} modulates in epochs {window[0]} to "
          f"{window[1]} (its official window): pass steps_per_epoch= to "
          "make_train_step, or build the method with schedule='warmup' to "
          "use warmup_steps instead.")
    _check_int(steps_per_epoch, "steps_per_epoch", 1)
    if not isinstance(warmup_steps, jax.core.Tracer) and warmup_steps:
      raise ValueError(
          f"{type(method).__name__} modulates in epochs {window[0]} to "
          f"{window[1]} (its official window), which replaces the warm-up: "
          f"use warmup_steps=0 (got {warmup_steps}), or build the method "
          "with schedule='warmup'.")
  custom_loss = type(method).loss is not Method.loss
  if custom_loss and (accumulation_steps > 1 or method.per_loss_gradients):
    raise ValueError(
        f"method {type(method).__name__} defines its own loss, which reads "
        "the whole batch (its statistics are not sums over micro-batches): "
        "use accumulation_steps=1.")
  if method.alternating and (accumulation_steps > 1 or custom_loss
                             or method.per_loss_gradients):
    raise ValueError(
        f"method {type(method).__name__} alternates per-modality updates: "
        "use accumulation_steps=1, and no custom loss or per-loss gradients.")
  if method.alternating and normalize_loss_weights:
    raise ValueError(
        f"method {type(method).__name__} alternates per-modality updates with "
        "losses of its own: normalize_loss_weights does not apply to it.")
  checked: set[Any] = set()

  def check_tx_once(params, modalities):
    key = (jax.tree.structure(params), tuple(modalities))
    if key in checked:
      return
    labels = set(jax.tree.leaves(label_modalities(tuple(modalities))(params)))
    orphans = sorted(m for m in modalities if m not in labels)
    if orphans:
      raise ValueError(
          f"batch['inputs'] has {orphans}, but the model has no encoder for "
          f"{'it' if len(orphans) == 1 else 'them'}: no parameter path "
          f"contains {'that name' if len(orphans) == 1 else 'those names'} "
          f"(the batch's inputs: {sorted(modalities)}; the parameters' "
          f"labels: {sorted(labels)}). Give the batch only the model's "
          "modalities, or name each encoder module after its modality.")
    if not check_tx:
      checked.add(key)
      return
    if optimizer_checks.scales_take_effect(tx, params, modalities) is False:
      raise ValueError(
          "the modality scales have no effect with this optimiser: it "
          "normalises each coordinate (Adam, AdamW, Lion, RMSProp, "
          "Adafactor, ...), so a scale applied before it cancels. Put the "
          "scale after the optimiser, optax.chain(optimizer, "
          "arl_jax.scale_by_modality(labels)), or build tx with "
          "arl_jax.with_modality_scales(optimizer, labels), which places it "
          "where it acts; pass check_tx=False to train this way anyway.")
    checked.add(key)

  def split_model(params, model_state):
    """``encode`` / ``classify`` closures when ``apply_fn`` carries them."""
    encode = getattr(apply_fn, "encode", None)
    classify = getattr(apply_fn, "classify", None)
    if encode is None or classify is None:
      return {}
    return {"encode": lambda x: encode(params, model_state, x),
            "classify": lambda f: classify(params, f)}

  def forward_backward(params, model_state, inputs, labels, mask, rng, gamma,
                       weight_of, method_state=(), active=True):
    """Loss (times ``weight_of(rows)``), gradients, batch sums and what the
    method's loss returned besides the loss (``{}`` by default)."""

    def loss_fn(params):
      outputs, new_model_state = apply_fn(params, model_state, inputs,
                                          train=True, rng=rng)
      fused, unimodal, _ = _check_outputs(outputs, inputs)
      rows, safe, invalid = _label_mask(labels, mask, jnp.shape(fused)[-1])
      if custom_loss:
        def forward(x):     # the same parameters, evaluation mode
          outs, _ = apply_fn(params, model_state, x, train=False, rng=rng)
          return _check_outputs(outs, x)[:2]
        loss, method_aux = method.loss(LossContext(
            fused=fused, unimodal=unimodal, labels=safe, rows=rows,
            gamma=gamma, active=active, state=method_state, inputs=inputs,
            forward=forward, axis_name=axis_name,
            features=_features_of(outputs), **split_model(params,
                                                          model_state)))
      else:
        loss = losses.arl_loss(fused, unimodal, safe, gamma, mask=rows)
        method_aux = {}
      count = jnp.sum(rows.astype(jnp.float32))
      return loss * weight_of(count), (fused, unimodal, new_model_state,
                                        rows, safe, invalid, method_aux)

    if method.per_loss_gradients:
      # One forward pass; the K + 1 loss terms' gradients from one vjp, their
      # cotangents (the rows of the identity) pulled back together.
      def terms_fn(params):
        outputs, new_model_state = apply_fn(params, model_state, inputs,
                                            train=True, rng=rng)
        fused, unimodal, _ = _check_outputs(outputs, inputs)
        rows, safe, invalid = _label_mask(labels, mask, jnp.shape(fused)[-1])
        terms = losses.loss_terms(fused, unimodal, safe, mask=rows)
        count = jnp.sum(rows.astype(jnp.float32))
        return terms * weight_of(count), (fused, unimodal, new_model_state,
                                          rows, safe, invalid)

      terms, pull_back, aux = jax.vjp(terms_fn, params, has_aux=True)
      fused, unimodal, new_model_state, rows, safe, invalid = aux
      names = _validation.modality_names(unimodal, "unimodal logits")
      # The method's combinations of the loss terms (default: each term).
      combos = method.loss_cotangents(names)
      (stacked,) = jax.vmap(pull_back)(jnp.asarray(
          [combos[k] for k in combos], terms.dtype))
      grads = {key: jax.tree.map(lambda g, i=i: g[i], stacked)
               for i, key in enumerate(combos)}
      loss = terms[0] + gamma * jnp.sum(terms[1:])
      method_aux = {}
    else:
      (loss, (fused, unimodal, new_model_state, rows, safe, invalid,
              method_aux)), grads = (
          jax.value_and_grad(loss_fn, has_aux=True)(params))
    sums = (stats_lib.modality_statistics(unimodal, safe, rows),
            stats_lib.prediction_statistics(fused, safe, rows), invalid)
    return loss, grads, sums, new_model_state, method_aux

  def alternating_update(state, inputs, labels, mask, rng, gamma, in_warmup,
                         weight_of):
    """One masked optimiser update per modality (:attr:`Method.alternating`).

    Sub-step ``m`` differentiates ``method.substep_loss(m, ...)`` at the
    parameters left by the previous sub-steps, lets the method modify the
    gradient, and applies ``tx`` to encoder ``m`` and the shared parameters
    only: every other leaf of the parameters and of the optimiser state
    keeps its value, and the optimiser's other state (step counts) is taken
    from the last sub-step alone, so it advances once per step. Statistics
    and metrics come from the first sub-step's forward pass (the parameters
    before the step).
    """
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
        outputs, new_model_state = apply_fn(p, state.model_state, inputs,
                                            train=True, rng=rng)
        fused, unimodal, _ = _check_outputs(outputs, inputs)
        rows, safe, invalid = _label_mask(labels, mask, jnp.shape(fused)[-1])
        features = _features_of(outputs)
        loss = method.substep_loss(m, LossContext(
            fused=fused, unimodal=unimodal, labels=safe, rows=rows,
            gamma=gamma, active=~in_warmup, state=method_state,
            inputs=inputs, forward=None, axis_name=axis_name,
            features=features))
        count = jnp.sum(rows.astype(jnp.float32))
        return loss * weight_of(count), (
            fused, unimodal, None if features is None else features[m],
            new_model_state, rows, safe, invalid)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      fused, unimodal, features, new_model_state, rows, safe, invalid = aux
      if first is None:
        first = (fused, unimodal, rows, safe, invalid)
      if axis_name is not None:
        loss, grads = jax.lax.psum((loss, grads), axis_name)
      grads, new_method_state = method.substep_gradients(
          m, grads, features, rows, method_state, state.step, axis_name)
      updates, new_opt_state = tx.update(grads, opt_state, params,
                                         modality_scales=ones)
      new_params = optax.apply_updates(params, updates)
      norm = optax.tree.norm(grads)
      ok = jnp.isfinite(loss) & jnp.isfinite(norm)
      if not skip_nonfinite_updates:
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
      model_states[m] = new_model_state
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
    fused, unimodal, rows, safe, invalid = first
    sums = (stats_lib.modality_statistics(unimodal, safe, rows),
            stats_lib.prediction_statistics(fused, safe, rows), invalid)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return (loss_total, sums, new_model_state, params, opt_state,
            method_state, all_ok, jnp.sqrt(sq_norm))

  def train_step(state: TrainState, batch: Mapping[str, Any]):
    if not _has_scale_by_modality(state.opt_state):
      raise ValueError(
          "the optimiser state has no scale_by_modality: build tx with "
          "arl_jax.with_modality_scales(optimizer, param_labels) (or chain "
          "arl_jax.scale_by_modality(param_labels) into it), otherwise the "
          "method's gradient scales would be silently ignored.")
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    if preprocess is not None:
      batch = preprocess(batch, jax.random.fold_in(rng, 1))
    inputs, labels, mask = _unpack_batch(batch)
    inputs = _zero_masked_rows(inputs, mask)
    if isinstance(inputs, Mapping):
      check_tx_once(state.params, tuple(inputs))
      _check_method_state(method, state, tuple(inputs))
    if window is None:
      in_warmup = state.step < warmup_steps
    else:
      epoch = state.step // steps_per_epoch
      in_warmup = (epoch < window[0]) | (epoch > window[1])
    gamma = jnp.where(in_warmup, method.warmup_gamma, method.gamma)

    def weight_of(count):       # share of the global batch held here
      if axis_name is None:
        return jnp.float32(1.0)
      return count / jnp.maximum(jax.lax.psum(count, axis_name), 1.0)

    if method.alternating:
      (loss, sums, new_model_state, params, opt_state, method_state, ok,
       grad_norm) = alternating_update(state, inputs, labels, mask, rng,
                                       gamma, in_warmup, weight_of)
      stats, fused_stats, invalid = sums
      heldout, combine_diagnostics = None, {}
      modulation, method_state = method.modulate(stats, None, method_state)
      scales = {m: jnp.ones((), jnp.float32) for m in stats}
      if skip_nonfinite_updates:
        new_model_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                                       new_model_state, state.model_state)
    else:
      if accumulation_steps == 1:
        loss, grads, sums, new_model_state, method_aux = forward_backward(
            state.params, state.model_state, inputs, labels, mask, rng, gamma,
            weight_of, state.method_state, ~in_warmup)
      else:
        # Sums over micro-batches (each loss weighted by its row count), then
        # one division by the rows of the whole (global) batch.
        micro = _micro_batches({"inputs": inputs, "labels": labels,
                                **({} if mask is None else {"mask": mask})},
                               accumulation_steps)

        def one(carry, xs):
          k, b = xs
          model_state, acc = carry
          loss, grads, sums, model_state, _ = forward_backward(
              state.params, model_state, b["inputs"], b["labels"],
              b.get("mask"), jax.random.fold_in(rng, 2 + k), gamma,
              lambda count: count)
          add = (loss, grads, sums)
          acc = add if acc is None else jax.tree.map(jnp.add, acc, add)
          return (model_state, acc), None

        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: one((state.model_state, None),
                        (0, jax.tree.map(lambda x: x[0], micro)))[0][1]))
        (new_model_state, (loss, grads, sums)), _ = jax.lax.scan(
            one, (state.model_state, zero),
            (jnp.arange(accumulation_steps), micro))
        rows = sums[1].count + sums[1].num_nonfinite
        if axis_name is not None:
          rows = jax.lax.psum(rows, axis_name)
        loss, grads = jax.tree.map(lambda x: x / jnp.maximum(rows, 1.0),
                                   (loss, grads))
        method_aux = {}
      if normalize_loss_weights:
        k = len(inputs) if isinstance(inputs, Mapping) else 1
        loss, grads = jax.tree.map(lambda x: x / (1.0 + gamma * k),
                                   (loss, grads))
      stats, fused_stats, invalid = sums
      heldout = None
      if "heldout" in batch:
        # Statistics only: a separate forward pass in evaluation mode, outside
        # the differentiated function, so the gradients are those without it.
        h_inputs, h_labels, h_mask = _unpack_batch(batch["heldout"])
        h_inputs = _zero_masked_rows(h_inputs, h_mask)
        outputs, _ = apply_fn(state.params, state.model_state, h_inputs,
                              train=False, rng=rng)
        h_fused, h_unimodal, _ = _check_outputs(outputs, h_inputs)
        rows, safe, _ = _label_mask(h_labels, h_mask, jnp.shape(h_fused)[-1])
        heldout = stats_lib.modality_statistics(h_unimodal, safe, rows)
      elif method.needs_heldout:
        raise ValueError(f"method {method!r} needs held-out rows: give each "
                         "batch a 'heldout' entry ({'inputs', 'labels', "
                         "'mask'}).")
      if axis_name is not None:
        loss, grads, stats, fused_stats, invalid, heldout = jax.lax.psum(
            (loss, grads, stats, fused_stats, invalid, heldout), axis_name)
        new_model_state = jax.lax.pmean(new_model_state, axis_name)
      combine_diagnostics = dict(method_aux.get("metrics", {}))
      method_state = method_aux.get("state", state.method_state)
      if method.per_loss_gradients:
        grads, combine_diagnostics = method.combine_gradients(
            grads, label_modalities(tuple(stats))(state.params), ~in_warmup)
      modulation, method_state = method.modulate(stats, heldout, method_state)
      scales = {m: jnp.where(in_warmup, 1.0, v).astype(jnp.float32)
                for m, v in modulation.scales.items()}
      extra = {"modality_scales": scales}
      if modulation.noise is not None:
        extra["modality_noise"] = {m: jnp.where(in_warmup, 0.0, v)
                                   for m, v in modulation.noise.items()}
      grad_norm = optax.tree.norm(grads)
      # One reduction instead of one per leaf: the norm is finite iff every
      # gradient entry is (barring a norm that overflows, i.e. > 3e38).
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

      def take_step():
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       **extra)
        return (optax.apply_updates(state.params, updates), opt_state,
                new_model_state, method_state)

      if skip_nonfinite_updates:
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
        "invalid_labels": invalid,
        **diagnostics,
        **combine_diagnostics,
        **_per_modality_metrics(stats, modulation, scales),
    }
    if heldout is not None:
      metrics["heldout_unimodal_accuracy"] = {
          m: s.correct / jnp.maximum(s.count, 1.0) for m, s in heldout.items()}
    # One output per metric, not one per metric and modality.
    metrics = stack_per_modality(metrics, tuple(sorted(stats)))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state,
                              model_state=new_model_state,
                              method_state=method_state)
    return new_state, metrics

  # Read by arl_jax.parallel.pmap_train_step: a step mapped over a device
  # axis it was not built for would train each device on its shard alone.
  train_step.axis_name = axis_name
  return train_step


def _verify_additive_head(apply_fn: ApplyFn, state: TrainState,
                          inputs: Mapping[str, Any], verified: set) -> None:
  """Refuses fusion weights for a head that is not additive (trace time).

  Checked once per parameter structure, structurally: the model's head
  (``apply_fn.classify``) with stand-in parameters of the same shapes, on
  random features of the encoders' output shapes
  (:func:`arl_jax.fusion_weighting.check_additive`).
  """
  classify = getattr(apply_fn, "classify", None)
  encode = getattr(apply_fn, "encode", None)
  if classify is None or encode is None:
    raise ValueError(
        "fusion_weights reweight the unimodal terms of an additive fusion "
        "head, so the eval step checks the model's head first: build apply_fn "
        "with arl_jax.models.make_apply_fn(model), or give your apply_fn "
        "attributes .encode(params, model_state, inputs) -> {modality: "
        "features} and .classify(params, features) -> logits (check a head "
        "yourself with arl_jax.fusion_weighting.check_additive(head, "
        "features)).")
  spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  params = jax.tree.map(spec, state.params)
  features = jax.eval_shape(encode, params,
                            jax.tree.map(spec, state.model_state),
                            jax.tree.map(spec, inputs))
  key = (jax.tree.structure(params), str(jax.tree.leaves(params)),
         str(features))
  if key in verified:
    return

  def probe():
    p = optimizer_checks._stand_ins(params, 0.5, seed=0)
    rng = np.random.default_rng(1)
    f = {m: jnp.asarray(rng.normal(size=(8,) + tuple(v.shape[1:])),
                        jnp.float32) for m, v in features.items()}
    fusion_lib.check_additive(lambda x: classify(p, x), f)

  # Concrete values outside the caller's trace (as the optimiser probes).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pool.submit(probe).result()
  verified.add(key)


def make_eval_step(apply_fn: ApplyFn, preprocess: Callable | None = None,
                   method: Method | None = None, axis_name: Any = None, *,
                   batch_transform: Callable | None = None
                   ) -> Callable[..., dict[str, Any]]:
  """Builds ``eval_step(state, batch, fusion_weights=None) -> sums``.

  ``preprocess``: optional deterministic ``batch -> batch`` traced in
  first (e.g. ``FrameAugmentation().eval``; ``batch_transform``: its
  deprecated name). ``fusion_weights``: optional
  ``{modality: w_m}`` (traced) that reweight the unimodal logit terms of an
  additive fusion head (:func:`arl_jax.fusion_weighting.weighted_fusion_logits`)
  before the fused prediction is scored; the head is checked first
  (``apply_fn.classify``, as :func:`arl_jax.models.make_apply_fn` gives it:
  a gated, FiLM or attention head, or an ``apply_fn`` without it, raises a
  ValueError saying why). ``method``: the scored logits are
  ``method.eval_logits(fused, unimodal, valid)`` (MLA's gated fusion; the
  fused logits for every other method) unless ``fusion_weights`` are given;
  ``axis_name``: the device axis when the step runs under ``pmap`` (a
  batch-level gate is then computed over the global batch).

  Returns batch *sums* (``count``, ``correct``, ``loss_sum``,
  ``invalid_labels`` and per-modality ``unimodal_correct``) plus per-row
  ``predictions``, ``labels``, ``valid``, ``fused_logits`` and
  ``unimodal_logits``, so
  that adding them over batches gives exact accuracy on the whole split,
  padded last batch included (rows with ``mask`` False, or a label outside
  ``[0, C)``, count nowhere).
  """
  preprocess = _renamed(preprocess, batch_transform, "make_eval_step")
  verified: set[Any] = set()

  def eval_step(state: TrainState, batch: Mapping[str, Any],
                fusion_weights: Mapping[str, Any] | None = None):
    if preprocess is not None:
      batch = preprocess(batch)
    inputs, labels, mask = _unpack_batch(batch)
    outputs, _ = apply_fn(state.params, state.model_state, inputs,
                          train=False, rng=state.rng)
    fused, unimodal, _ = _check_outputs(outputs, inputs)
    valid, safe, invalid = _label_mask(labels, mask, jnp.shape(fused)[-1])
    if fusion_weights is not None:
      _verify_additive_head(apply_fn, state, inputs, verified)
      fused = fusion_lib.weighted_fusion_logits(fused, unimodal,
                                                fusion_weights)
    elif method is not None:
      fused = method.eval_logits(fused, unimodal, valid, axis_name)
    fused_stats = stats_lib.prediction_statistics(fused, safe, valid)
    stats = stats_lib.modality_statistics(unimodal, safe, valid)
    # Rows with a non-finite prediction count as errors, not as absent.
    return {
        "count": jnp.sum(valid.astype(jnp.float32)),
        "invalid_labels": invalid,
        "correct": fused_stats.correct,
        "loss_sum": fused_stats.loss_sum,
        "unimodal_correct": {m: s.correct for m, s in stats.items()},
        "predictions": jnp.argmax(fused, axis=-1),
        "labels": labels,
        "valid": valid,
        "fused_logits": fused.astype(jnp.float32),
        "unimodal_logits": {m: v.astype(jnp.float32)
                            for m, v in unimodal.items()},
    }

  return eval_step
