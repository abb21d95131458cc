"""Epoch hooks in any training loop; public API: :mod:`arl_jax.epoch_hooks`.

A method with ``has_epoch_hook`` (PMR's prototypes, D&R's
re-initialisation, G-Blending's loss weights) runs ``method.epoch_end(epoch,
state, EpochContext)`` outside jit, before training (epoch 0) and after
every epoch. :class:`EpochHook` builds the context from what a loop already
has (the model, the optimiser, its batches) and calls it; the runner
(``experiments/train.py``) uses the same class.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arl_jax._src import step_parts as parts
from arl_jax._src.method_protocol import EpochContext
from arl_jax._src.method_protocol import Method
from arl_jax._src.train_step import make_eval_step
from arl_jax._src.train_step import make_train_step

Batches = Callable[[], Iterable[Mapping[str, Any]]]

# Copies of the model (G-Blending) shuffle with seeds the run never uses.
COPY_SEED_OFFSET = 100_000


def _copy_steps(apply_fn, tx, train_preprocess, eval_preprocess):
  """The (unjitted) train and eval steps of a copy, ``(state, batch, keep)``
  with ``keep`` ``{modality: bool}`` (traced: one program serves every
  head): plain cross-entropy of the fused logits, every input not kept
  zeroed before its encoder."""
  def zeroed(keep):
    def apply(params, model_state, inputs, *, train, rng):
      x = {m: jnp.where(keep[m], v, jnp.zeros_like(v))
           for m, v in inputs.items()}
      return apply_fn(params, model_state, x, train=train, rng=rng)
    return apply

  def train_step(state, batch, keep):
    return make_train_step(zeroed(keep), tx, Method(), check_tx=False,
                           preprocess=train_preprocess)(state, batch)

  def eval_step(state, batch, keep):
    return make_eval_step(zeroed(keep), preprocess=eval_preprocess)(state,
                                                                    batch)
  return train_step, eval_step


def _keep_mask(keep, inputs) -> dict:
  return {m: np.bool_(m in keep) for m in inputs}


def _mean_cross_entropy(out) -> float:
  """Mean CE of an evaluation's fused logits over its counted rows
  (float64, on the host)."""
  valid = np.asarray(out["valid"])
  z = np.asarray(out["fused_logits"], np.float64)[valid]
  y = np.asarray(out["labels"])[valid]
  logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
  return float(-np.mean(logp[np.arange(len(y)), y])) if len(y) else 0.0


def _without_heldout(batch):
  return {k: v for k, v in batch.items() if k != "heldout"}


def make_fit_copy(apply_fn, tx: optax.GradientTransformation,
                  train_batches: Callable[[int], Iterable[Mapping[str, Any]]],
                  validation_batches: Batches, *,
                  train_preprocess: Callable | None = None,
                  eval_preprocess: Callable | None = None):
  """``fit_copy(state, keep, epochs) -> (train_sums, validation_sums)``, the
  :class:`EpochContext` entry G-Blending trains its copies with.

  The copy starts from ``state`` with a fresh optimiser state (``tx.init``)
  and trains ``epochs`` epochs, plain cross-entropy of the fused logits,
  with every input outside ``keep`` zeroed (before its encoder). Returns per
  copy-epoch the sum of the per-batch mean training losses and the sum of
  the per-batch mean validation losses after the epoch (evaluation mode).
  ``train_batches(seed)`` yields one epoch of training batches in the
  order of ``seed`` (copy-epoch ``j`` reads ``COPY_SEED_OFFSET + j``, orders
  the run itself never uses); a batch's ``"heldout"`` entry is dropped.
  Which inputs are kept is an argument of the compiled steps: one program
  serves every ``keep``.
  """
  step, evaluate = (jax.jit(f) for f in _copy_steps(
      apply_fn, tx, train_preprocess, eval_preprocess))

  def fit_copy(state, keep, epochs):
    copy = state.replace(opt_state=tx.init(state.params))
    train_sums, val_sums = [], []
    for j in range(epochs):
      losses = []
      for batch in train_batches(COPY_SEED_OFFSET + j):
        mask = _keep_mask(keep, batch["inputs"])
        copy, metrics = step(copy, _without_heldout(batch), mask)
        losses.append(metrics["loss"])
      train_sums.append(float(np.sum(jax.device_get(losses))))
      val = 0.0
      for batch in validation_batches():
        val += _mean_cross_entropy(jax.device_get(evaluate(
            copy, batch, _keep_mask(keep, batch["inputs"]))))
      val_sums.append(val)
    return train_sums, val_sums

  return fit_copy


def _take(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def make_fit_copy_over_seeds(
    apply_fn, txs: Sequence[optax.GradientTransformation],
    train_batches: Sequence[Callable[[int], Iterable[Mapping[str, Any]]]],
    validation_batches: Batches, *,
    train_preprocess: Callable | None = None,
    eval_preprocess: Callable | None = None):
  """:func:`make_fit_copy` for a state stacked over seeds: every seed's copy
  trains in one program (the copy's step ``jax.vmap``-ed over the seed
  axis), seed ``k`` on ``train_batches[k]``'s orders with ``txs[k].init``
  (the seeds' optimisers may differ in their initial state only). Returns
  ``(train_sums, validation_sums)`` as float64 arrays ``[epochs, seeds]``,
  each seed's entries computed as :func:`make_fit_copy` computes them."""
  if len(txs) != len(train_batches):
    raise ValueError(f"one optimiser per seed: {len(txs)} optimisers for "
                     f"{len(train_batches)} seeds' batches.")
  step, evaluate = _copy_steps(apply_fn, txs[0], train_preprocess,
                               eval_preprocess)
  step = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
  evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)))

  def fit_copy(state, keep, epochs):
    n = len(txs)
    copy = state.replace(opt_state=_stack([
        jax.device_get(tx.init(_take(state.params, k)))
        for k, tx in enumerate(txs)]))
    train_sums, val_sums = [], []
    for j in range(epochs):
      losses = []
      for per_seed in zip(*(b(COPY_SEED_OFFSET + j) for b in train_batches)):
        copy, metrics = step(copy, _stack([_without_heldout(b)
                                           for b in per_seed]),
                             _keep_mask(keep, per_seed[0]["inputs"]))
        losses.append(metrics["loss"])
      losses = np.stack(jax.device_get(losses))          # [steps, seeds]
      train_sums.append([float(np.sum(np.ascontiguousarray(losses[:, k])))
                         for k in range(n)])
      val = [0.0] * n
      for batch in validation_batches():
        out = jax.device_get(evaluate(copy, batch,
                                      _keep_mask(keep, batch["inputs"])))
        val = [v + _mean_cross_entropy(_take(out, k))
               for k, v in enumerate(val)]
      val_sums.append(val)
    return (np.asarray(train_sums, np.float64),
            np.asarray(val_sums, np.float64))

  return fit_copy


def batch_features(feature_fn: Callable, state, batches: Batches, *,
                   preprocess: Callable | None = None):
  """``({modality: [rows, d]}, labels)``: ``feature_fn(state, inputs)`` (the
  encoders' evaluation-mode features) of every counted row of ``batches()``
  (rows whose ``mask`` is False are dropped), each batch through
  ``preprocess`` first where given."""
  parts_, labels = [], []
  for batch in batches():
    if preprocess is not None:
      batch = preprocess(batch)
    inputs, y, mask = parts.unpack_batch(batch)
    keep = (np.ones(np.shape(y), bool) if mask is None
            else np.asarray(mask, bool))
    feats = jax.device_get(feature_fn(state, inputs))
    parts_.append({m: np.asarray(v)[keep] for m, v in feats.items()})
    labels.append(np.asarray(y)[keep])
  if not parts_:
    raise ValueError("batch_features: the batches are empty.")
  return ({m: np.concatenate([p[m] for p in parts_]) for m in parts_[0]},
          np.concatenate(labels))


class EpochHook:
  """Runs a method's epoch hook in a loop of your own.

  ::

    hook = arl_jax.epoch_hooks.EpochHook(
        method, apply_fn=apply_fn, tx=tx, num_classes=10,
        train_batches=lambda seed: batches(train, seed),
        validation_batches=lambda: batches(validation, 0),
        num_epochs=30)
    state, record = hook(0, state)          # before training
    for epoch in range(1, 31):
      ...                                   # the epoch's steps
      state, record = hook(epoch, state)    # after it

  For a method without a hook the call returns ``(state, {})``.

  Args:
    method: the balancing method.
    apply_fn: the model (``make_train_step``'s form); the encoders' features
      come from ``apply_fn.encode(params, model_state, inputs)``
      (:func:`arl_jax.models.make_apply_fn` gives it) unless ``feature_fn``
      or ``features`` is given.
    tx: the optimiser (G-Blending's copies restart it).
    num_classes: the number of classes.
    train_batches: ``seed -> iterable`` of training batches (one epoch, in
      ``seed``'s order).
    validation_batches: ``() -> iterable`` of validation batches (never the
      test split: the hooks select on it).
    modalities: the modality names (default: those of the first batch).
    num_epochs: the length of the run (D&R scales its schedule to it).
    seed: the run's seed (PMR's and D&R's sampling).
    feature_batches: ``{"train" | "validation": () -> iterable}``, the
      batches the features are read from (default: ``train_batches(0)``
      and ``validation_batches``; give unaugmented training batches).
    feature_fn: ``(state, inputs) -> {m: [batch, d]}`` (jitted here).
    features: ``(state, split) -> ({m: [rows, d]}, labels)``, replacing the
      batch-wise features altogether (the runner reads in-memory splits).
    train_preprocess, eval_preprocess: what the run's steps apply to a
      batch first (device augmentation).
  """

  def __init__(self, method: Method, *, apply_fn, tx, num_classes: int,
               train_batches, validation_batches: Batches,
               modalities=None, num_epochs: int | None = None, seed: int = 0,
               feature_batches: Mapping[str, Batches] | None = None,
               feature_fn: Callable | None = None,
               features: Callable | None = None,
               train_preprocess: Callable | None = None,
               eval_preprocess: Callable | None = None):
    self.method = method
    self.num_classes = int(num_classes)
    self.modalities = None if modalities is None else tuple(modalities)
    self.num_epochs = num_epochs
    self.seed = seed
    self._train_batches = train_batches
    self._split_batches = {"train": lambda: train_batches(0),
                           "validation": validation_batches,
                           **dict(feature_batches or {})}
    self._features = features
    if feature_fn is None and features is None:
      encode = getattr(apply_fn, "encode", None)
      if encode is None and method.has_epoch_hook:
        raise ValueError(
            f"{type(method).__name__}'s epoch hook reads the encoders' "
            "features: build apply_fn with arl_jax.models.make_apply_fn, "
            "or pass feature_fn=(state, inputs) -> {modality: features}.")
      if encode is not None:
        feature_fn = lambda st, x: encode(st.params, st.model_state, x)
    self._feature_fn = None if feature_fn is None else jax.jit(feature_fn)
    self._eval_preprocess = (None if eval_preprocess is None
                             else jax.jit(eval_preprocess))
    self.fit_copy = make_fit_copy(apply_fn, tx, train_batches,
                                  validation_batches,
                                  train_preprocess=train_preprocess,
                                  eval_preprocess=eval_preprocess)
    # What SeedEpochHooks builds its copies from.
    self._copy_parts = dict(apply_fn=apply_fn, tx=tx,
                            train_batches=train_batches,
                            validation_batches=validation_batches,
                            train_preprocess=train_preprocess,
                            eval_preprocess=eval_preprocess)

  def _names(self):
    if self.modalities is None:
      first = next(iter(self._train_batches(0)))
      self.modalities = tuple(first["inputs"])
    return self.modalities

  def context(self, state) -> EpochContext:
    """The :class:`EpochContext` of ``state`` (a host copy)."""
    def features(split):
      if split not in ("train", "validation"):
        raise ValueError(f"an epoch hook reads the 'train' or 'validation' "
                         f"split, never {split!r}.")
      if self._features is not None:
        return self._features(state, split)
      return batch_features(self._feature_fn, state,
                            self._split_batches[split],
                            preprocess=self._eval_preprocess)
    return EpochContext(modalities=self._names(),
                        num_classes=self.num_classes, features=features,
                        seed=self.seed, fit_copy=self.fit_copy,
                        num_epochs=self.num_epochs)

  def __call__(self, epoch: int, state) -> tuple[Any, dict]:
    """``method.epoch_end(epoch, state, context)`` on a host copy of
    ``state``; returns ``(state, record)`` (``(state, {})`` for a method
    without a hook). Put the state back on your devices afterwards if it
    was replicated or sharded."""
    if not self.method.has_epoch_hook:
      return state, {}
    host = jax.device_get(state)
    return self.method.epoch_end(epoch, host, self.context(host))


class SeedEpochHooks:
  """The epoch hooks of a run whose state is stacked over seeds (a leading
  seed axis on every leaf, as ``jax.vmap``-ed steps keep it).

  ``hooks[k]`` is seed ``k``'s :class:`EpochHook` (its own batch orders,
  optimiser and seed). ``state, records = hooks(epoch, stacked_state)``
  returns the new stacked state and one record per seed. A method with
  ``epoch_hook_over_seeds`` (G-Blending) is called once, with every seed's
  model copies trained in one program
  (:func:`make_fit_copy_over_seeds`); any other method's hook runs seed by
  seed on that seed's slice of the state. Either way seed ``k``'s result
  is what ``hooks[k]`` gives on its own (to float rounding of the vmapped
  arithmetic).
  """

  def __init__(self, hooks: Sequence[EpochHook]):
    self.hooks = list(hooks)
    if not self.hooks:
      raise ValueError("SeedEpochHooks needs one EpochHook per seed; got "
                       "none.")
    self.method = self.hooks[0].method
    self.fit_copy = None
    if self.method.has_epoch_hook and self.method.epoch_hook_over_seeds:
      first = self.hooks[0]._copy_parts
      self.fit_copy = make_fit_copy_over_seeds(
          first["apply_fn"], [h._copy_parts["tx"] for h in self.hooks],
          [h._copy_parts["train_batches"] for h in self.hooks],
          first["validation_batches"],
          train_preprocess=first["train_preprocess"],
          eval_preprocess=first["eval_preprocess"])

  def __call__(self, epoch: int, state) -> tuple[Any, list[dict]]:
    n = len(self.hooks)
    if not self.method.has_epoch_hook:
      return state, [{} for _ in range(n)]
    host = jax.device_get(state)
    if self.fit_copy is None:
      outs = [hook(epoch, _take(host, k))
              for k, hook in enumerate(self.hooks)]
      return _stack([jax.device_get(o[0]) for o in outs]), [o[1]
                                                           for o in outs]
    first = self.hooks[0]
    context = EpochContext(modalities=first._names(),
                           num_classes=first.num_classes, features=None,
                           seed=first.seed, fit_copy=self.fit_copy,
                           num_epochs=first.num_epochs, num_seeds=n)
    state, records = self.method.epoch_end(epoch, host, context)
    if len(records) != n:
      raise ValueError(f"{type(self.method).__name__}.epoch_end over {n} "
                       f"seeds returned {len(records)} records.")
    return state, list(records)
