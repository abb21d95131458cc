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
from arl_jax._src import optimizer_checks
from arl_jax._src import statistics as stats_lib
from arl_jax._src import step_parts as parts
from arl_jax._src.labels import label_modalities
from arl_jax._src.method_protocol import Method
from arl_jax._src.modality_values import stack_per_modality
from arl_jax._src.transforms import ScaleByModalityState

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
  custom_loss = parts.StepSpec(apply_fn, tx, method).custom_loss
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
  spec = parts.StepSpec(apply_fn, tx, method, axis_name,
                        skip_nonfinite_updates)

  def check_tx_once(params, modalities):
    key = (jax.tree.structure(params), tuple(modalities))
    if key in checked:
      return
    _check_encoders(params, modalities)
    if check_tx and optimizer_checks.scales_take_effect(
        tx, params, modalities) is False:
      raise ValueError(
          "the modality scales have no effect with this optimiser: it "
          "normalises each coordinate (Adam, AdamW, Lion, RMSProp, "
          "Adafactor, ...), so a scale applied before it cancels. Put the "
          "scale after the optimiser, optax.chain(optimizer, "
          "arl_jax.scale_by_modality(labels)), or build tx with "
          "arl_jax.with_modality_scales(optimizer, labels), which places it "
          "where it acts; pass check_tx=False to train this way anyway.")
    checked.add(key)

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
    inputs, labels, mask = parts.unpack_batch(batch)
    inputs = parts.zero_masked_rows(inputs, mask)
    if isinstance(inputs, Mapping):
      check_tx_once(state.params, tuple(inputs))
      _check_method_state(method, state, tuple(inputs))
    in_warmup = parts.modulation_off(method, state.step, warmup_steps,
                                     steps_per_epoch)
    gamma = jnp.where(in_warmup, method.warmup_gamma, method.gamma)
    weight_of = parts.global_share(axis_name)
    heldout, combine_diagnostics = None, {}

    if method.alternating:
      (loss, sums, new_model_state, params, opt_state, method_state, ok,
       grad_norm) = parts.alternating_update(spec, state, inputs, labels,
                                             mask, rng, gamma, in_warmup,
                                             weight_of)
      modulation, method_state = method.modulate(sums.modalities, None,
                                                 method_state)
      scales = {m: jnp.ones((), jnp.float32) for m in sums.modalities}
      if skip_nonfinite_updates:
        new_model_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                                       new_model_state, state.model_state)
    else:
      if accumulation_steps == 1:
        loss, grads, sums, new_model_state, method_aux = (
            parts.forward_and_loss(spec, state.params, state.model_state,
                                   inputs, labels, mask, rng, gamma,
                                   weight_of, state.method_state,
                                   ~in_warmup))
      else:
        loss, grads, sums, new_model_state, method_aux = (
            parts.accumulated_forward_and_loss(
                spec, state.params, state.model_state, inputs, labels, mask,
                rng, gamma, accumulation_steps))
      if normalize_loss_weights:
        k = len(inputs) if isinstance(inputs, Mapping) else 1
        loss, grads = jax.tree.map(lambda x: x / (1.0 + gamma * k),
                                   (loss, grads))
      if "heldout" in batch:
        heldout = parts.heldout_statistics(apply_fn, state.params,
                                           state.model_state,
                                           batch["heldout"], rng)
      elif method.needs_heldout:
        raise ValueError(f"method {method!r} needs held-out rows: give each "
                         "batch a 'heldout' entry ({'inputs', 'labels', "
                         "'mask'}).")
      if axis_name is not None:
        loss, grads, sums, heldout = jax.lax.psum(
            (loss, grads, sums, heldout), axis_name)
        new_model_state = jax.lax.pmean(new_model_state, axis_name)
      combine_diagnostics = dict(method_aux.get("metrics", {}))
      method_state = method_aux.get("state", state.method_state)
      if method.per_loss_gradients:
        grads, combine_diagnostics = method.combine_gradients(
            grads, label_modalities(tuple(sums.modalities))(state.params),
            ~in_warmup)
      modulation, method_state, scales, update_kwargs = parts.modulate(
          method, sums.modalities, heldout, method_state, in_warmup)
      params, opt_state, new_model_state, method_state, ok, grad_norm = (
          parts.apply_update(spec, state, loss, grads, update_kwargs,
                             new_model_state, method_state))
    metrics = parts.step_metrics(loss, sums, gamma, in_warmup, grad_norm, ok,
                                 modulation, scales, heldout,
                                 combine_diagnostics)
    # One output per metric, not one per metric and modality.
    metrics = stack_per_modality(metrics, tuple(sorted(sums.modalities)))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state,
                              model_state=new_model_state,
                              method_state=method_state)
    return new_state, metrics

  # Read by arl_jax.parallel.pmap_train_step: a step mapped over a device
  # axis it was not built for would train each device on its shard alone.
  train_step.axis_name = axis_name
  return train_step


def _check_encoders(params: Any, modalities) -> None:
  """Every input modality has an encoder: a parameter path naming it."""
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
    inputs, labels, mask = parts.unpack_batch(batch)
    outputs, _ = apply_fn(state.params, state.model_state, inputs,
                          train=False, rng=state.rng)
    fused, unimodal, _ = parts.check_outputs(outputs, inputs)
    valid, safe, invalid = parts.label_mask(labels, mask, jnp.shape(fused)[-1])
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
