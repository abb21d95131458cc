"""The method protocol and registry.

A method is a small frozen dataclass (its fields are its hyper-parameters,
settable from configs) with what the train step needs. The step asks for
capabilities, never for names:

* ``gamma`` / ``warmup_gamma``: the weight of the unimodal cross-entropies in
  the default loss (Eq. 22) after and during warm-up;
* ``modulation(stats)`` / ``modulate(stats, heldout_stats, state)``: from the
  per-modality batch sums of :func:`arl_jax.modality_statistics`, the
  coefficients to report and the multiplier applied to each encoder's
  gradients (ARL, OGM-GE);
* ``init_state(modalities)`` / ``initial_state(modalities, params)``:
  persistent state kept in ``TrainState.method_state`` (ARL's EMA, AGM's
  running scores, PMR's prototypes, D&R's initial encoders, G-Blending's
  weights); ``needs_heldout``: held-out rows in every batch;
* ``loss(LossContext)``: the method's own loss, which may run the model
  again in evaluation mode (AGM's zeroed-input passes), read the encoders'
  features (``needs_features``: PMR) and return a new state;
* ``per_loss_gradients`` + ``combine_gradients``: one gradient per loss
  term from one forward pass and one ``jax.vjp`` (MMPareto);
* ``has_epoch_hook`` + ``epoch_end(epoch, state, EpochContext)``: run by the
  runner outside jit at epoch 0 and after every epoch (PMR's prototypes,
  D&R's re-initialisation, G-Blending's copies).
* ``alternating`` + ``substep_loss`` / ``substep_gradients``: one optimiser
  update per modality in every step, masked to that modality's encoder and
  the shared parameters (MLA);
* ``eval_logits(fused, unimodal, valid)``: the prediction at evaluation
  when the method fuses differently (MLA's entropy gates).

A new weighting rule is a new subclass plus :func:`register_method`; the
train step and the runner do not change. One module per method in
:mod:`arl_jax.methods`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arl_jax._src import losses
from arl_jax._src.statistics import ModalityStatistics

Array = jax.Array


class Modulation(NamedTuple):
  """What a method decides for one step, per modality."""
  coefficients: dict[str, Array]   # the method's coefficient (a_m, k_m, ...)
  scales: dict[str, Array]         # multiplier of encoder m's gradients
  noise: dict[str, Array] | None   # std multiplier of gradient noise, or None
  diagnostics: dict[str, Array] = {}   # extra scalar metrics of the step


class EpochContext(NamedTuple):
  """What an epoch hook (:meth:`Method.epoch_end`) can read.

  ``features(split)`` returns ``({modality: [rows, dim]}, labels)``: the
  encoders' evaluation-mode features of every row of ``"train"`` or
  ``"validation"`` (never the test split); ``num_epochs``: the length of
  the run (D&R scales its official 90-epoch schedule to it); ``fit_copy``:
  see below.
  """
  modalities: tuple
  num_classes: int
  features: Any
  seed: int = 0
  # fit_copy(state, keep, epochs) -> (train_loss_sums, validation_loss_sums):
  # trains a copy of ``state`` (fresh optimiser state) for ``epochs`` epochs
  # on CE of the fused logits with the inputs outside ``keep`` zeroed;
  # per copy-epoch sums of per-batch mean losses (G-Blending).
  fit_copy: Any = None
  num_epochs: int | None = None
  # Set only for a method with ``epoch_hook_over_seeds``, called once for
  # every seed of a run (:class:`arl_jax.epoch_hooks.SeedEpochHooks`): the
  # state then carries a leading seed axis of this size, ``fit_copy``
  # trains every seed's copy in one program and returns arrays
  # ``[epochs, seeds]``, ``features`` is None, and ``epoch_end`` returns one
  # record per seed.
  num_seeds: int | None = None


class LossContext(NamedTuple):
  """What a method's own loss (:meth:`Method.loss`) can read, in the step.

  ``fused`` and ``unimodal`` are the training-mode outputs of this batch;
  ``labels`` are safe to gather (out-of-range ones clipped) and ``rows``
  (bool ``[batch]``) says which rows count; ``forward(inputs)`` runs the
  same model, same parameters, in evaluation mode (differentiable: the loss
  may use it, e.g. with a modality's input zeroed); ``state`` is the
  method's state before the step; ``active`` is False during warm-up;
  ``axis_name`` is the device axis under ``pmap`` (None otherwise): a batch
  statistic is global only after :meth:`global_mean`; ``features`` are the
  encoders' training-mode outputs when ``apply_fn`` returns them as a third
  output (``arl_jax.models.make_apply_fn(model, with_features=True)``).
  """
  fused: Any
  unimodal: Mapping[str, Any]
  labels: Any
  rows: Any
  gamma: Any
  active: Any
  state: Any
  inputs: Mapping[str, Any]
  forward: Any
  axis_name: Any = None
  features: Any = None      # {m: [batch, d]} when apply_fn returns them
  # The model in two parts when ``apply_fn`` carries them (``make_apply_fn``
  # does): ``encode(inputs) -> {m: features}`` in evaluation mode and
  # ``classify(features) -> logits`` (the fusion head), same parameters,
  # differentiable; None otherwise.
  encode: Any = None
  classify: Any = None

  def cross_entropy(self, logits: Any) -> Any:
    """Mean cross-entropy of ``logits`` over the counted rows."""
    return losses.cross_entropy(logits, self.labels, mask=self.rows)

  def global_mean(self, per_row: Any) -> Any:
    """Mean of ``per_row [batch, ...]`` over the counted rows of the
    *global* batch (summed over devices under ``pmap``)."""
    w = self.rows.astype(jnp.float32)
    total = jnp.tensordot(w, per_row, axes=1)
    count = jnp.sum(w)
    if self.axis_name is not None:
      total, count = jax.lax.psum((total, count), self.axis_name)
    return total / jnp.maximum(count, 1.0)


SCHEDULES = ("window", "warmup")


def check_window(method: Any) -> None:
  """Validates a windowed method's ``schedule`` and epoch window fields."""
  if method.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}; got "
                     f"{method.schedule!r}.")
  starts, ends = method.modulation_starts, method.modulation_ends
  for what, v in (("modulation_starts", starts), ("modulation_ends", ends)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{what} must be an integer >= 0 (an epoch, counted "
                       f"from 0 as in the official code); got {v!r}.")
  if ends < starts:
    raise ValueError(f"modulation_ends ({ends}) is before modulation_starts "
                     f"({starts}).")


def official_window(method: Any) -> tuple[int, int] | None:
  """``(modulation_starts, modulation_ends)`` for ``schedule="window"``,
  None for ``schedule="warmup"``."""
  if method.schedule == "warmup":
    return None
  return int(method.modulation_starts), int(method.modulation_ends)


def _check_concrete(value: Any, what: str, ok, rule: str) -> None:
  """Raises if a concrete hyper-parameter breaks ``rule`` (tracers pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not ok(float(value)):
    raise ValueError(f"{what} must be {rule}; got {value}.")


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class: plain multimodal training, no balancing (``concat``).

  Attributes:
    gamma: weight of the unimodal cross-entropies after warm-up (Eq. 22).
    warmup_gamma: their weight during warm-up.
  """
  name: ClassVar[str] = "concat"
  gamma: float = 0.0
  warmup_gamma: float = 0.0

  def __post_init__(self):
    for field in ("gamma", "warmup_gamma"):
      _check_concrete(getattr(self, field), field, lambda v: v >= 0, ">= 0")

  def modulation(self, stats: Mapping[str, ModalityStatistics]) -> Modulation:
    ones = {m: jnp.ones((), jnp.float32) for m in stats}
    return Modulation(coefficients={m: jnp.zeros((), jnp.float32)
                                    for m in stats},
                      scales=ones, noise=None)

  def modulation_window(self) -> tuple[int, int] | None:
    """Epochs ``(first, last)``, 0-based and inclusive, in which the method
    modulates, as its official code's ``modulation_starts <= epoch <=
    modulation_ends``; outside them the step runs as in warm-up
    (``LossContext.active`` False, scales 1, no noise). None (the default):
    the shared warm-up decides (``make_train_step(warmup_steps=...)``).
    OGM-GE, AGM and PMR return their window (``schedule="window"``)."""
    return None

  @property
  def needs_heldout(self) -> bool:
    """Whether every training batch must carry held-out rows."""
    return False

  def init_state(self, modalities) -> Any:
    """The method's persistent state (a pytree; ``()`` if it keeps none)."""
    del modalities
    return ()

  def initial_state(self, modalities, params) -> Any:
    """The state :meth:`TrainState.create` stores: :meth:`init_state`, or,
    for a method that keeps something of the parameters (D&R's initial
    encoders), built from ``params``."""
    del params
    return self.init_state(modalities)

  # Epoch hook. A method that sets this is called by the runner after each
  # epoch's evaluation, outside jit: ``epoch_end(epoch, state, context) ->
  # (state, metrics)`` may replace parameters or method state (D&R's soft
  # re-initialisation); the runner checkpoints what it returns.
  has_epoch_hook: ClassVar[bool] = False
  # Whether ``epoch_end`` also takes a state stacked over seeds (see
  # ``EpochContext.num_seeds``); otherwise a multi-seed loop calls it seed
  # by seed.
  epoch_hook_over_seeds: ClassVar[bool] = False
  # Whether the method's loss reads the encoders' features (PMR): the model
  # must return them (``make_apply_fn(model, with_features=True)``).
  needs_features: ClassVar[bool] = False

  def epoch_end(self, epoch: int, state: Any, context: EpochContext
                ) -> tuple[Any, dict]:
    del epoch, context
    return state, {}

  def loss(self, ctx: LossContext) -> tuple[Any, dict]:
    """The training loss (a mean over ``ctx.rows``) and extras.

    Default: Eq. 22, ``CE(p_f, y) + gamma * sum_m CE(p_m, y)``. A method
    that overrides it (AGM) may return, besides the loss, ``{"state": new
    method state, "metrics": {name: scalar or {modality: scalar}}}``; the
    state then goes on to :meth:`modulate`.
    """
    return losses.arl_loss(ctx.fused, ctx.unimodal, ctx.labels, ctx.gamma,
                           mask=ctx.rows), {}

  # Per-loss gradients. A method that sets this receives, instead of the
  # gradient of Eq. 22, one gradient per loss term -- {"fused": ..., m: ...}
  # for CE(p_f, y) and each CE(p_m, y) -- from one forward pass and one
  # jax.vjp (the K + 1 cotangents pulled back together), summed over devices
  # and micro-batches, and combines them in ``combine_gradients``.
  per_loss_gradients: ClassVar[bool] = False

  def loss_cotangents(self, names) -> dict[str, tuple[float, ...]]:
    """The combinations of ``[CE(p_f), CE(p_m1), ..., CE(p_mK)]`` whose
    gradients :meth:`combine_gradients` receives (one backward pass each);
    default: every term alone, keyed ``"fused"`` and by modality."""
    k = len(names)
    out = {"fused": (1.0,) + (0.0,) * k}
    for i, m in enumerate(names):
      out[m] = tuple(1.0 if j == i + 1 else 0.0 for j in range(k + 1))
    return out

  def combine_gradients(self, grads: Mapping[str, Any], labels: Any,
                        active: Array) -> tuple[Any, dict[str, Array]]:
    """``(gradient, diagnostics)`` from the per-loss gradients.

    Args:
      grads: one gradient tree (the parameters' structure) per entry of
        :meth:`loss_cotangents` (by default ``{"fused": ..., modality:
        ...}``, one per loss term).
      labels: the parameters' tree of modality labels
        (:func:`arl_jax.label_modalities`; ``"shared"`` outside encoders).
      active: scalar bool, False during warm-up.
    """
    raise NotImplementedError(
        f"{type(self).__name__} sets per_loss_gradients but does not define "
        "combine_gradients.")

  # Alternating sub-steps. A method that sets this is trained, in every
  # step, by one optimiser update per modality (``substep_order``), each on
  # ``substep_loss`` and masked to that modality's encoder and the shared
  # parameters (the head): the other encoders' parameters and optimiser
  # state do not move; the optimiser's counter advances once per step.
  alternating: ClassVar[bool] = False

  def substep_order(self, names) -> tuple[str, ...]:
    """The order of the per-modality sub-steps (default: sorted names)."""
    return tuple(sorted(names))

  def substep_loss(self, modality: str, ctx: LossContext) -> Any:
    """Sub-step ``modality``'s loss; default ``CE(p_m, y)``."""
    return ctx.cross_entropy(ctx.unimodal[modality])

  def substep_gradients(self, modality: str, grads: Any, features: Any,
                        rows: Any, state: Any, step: Any,
                        axis_name: Any = None) -> tuple[Any, Any]:
    """Sub-step ``modality``'s gradient before the update, and the state."""
    del modality, features, rows, step, axis_name
    return grads, state

  def eval_logits(self, fused: Any, unimodal: Mapping[str, Any], valid: Any,
                  axis_name: Any = None) -> Any:
    """The logits scored at evaluation; default the fused logits."""
    del unimodal, valid, axis_name
    return fused

  def modulate(self, stats: Mapping[str, ModalityStatistics],
               heldout: Mapping[str, ModalityStatistics] | None,
               state: Any) -> tuple[Modulation, Any]:
    """One step's modulation from the batch (and held-out) sums and state."""
    del heldout
    return self.modulation(stats), state


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method] | None = None, *, replace: bool = False):
  """Makes a :class:`Method` subclass reachable by its ``name`` (a decorator).

  ``@register_method`` or ``@register_method(replace=True)``. A name already
  taken by another class raises a ValueError, unless ``replace`` is True or
  the new class is the same definition run again (same module and qualified
  name: a notebook cell re-run, a module reloaded), which replaces the old.
  """
  def register(cls: type[Method]) -> type[Method]:
    old = _REGISTRY.get(cls.name)
    rerun = old is not None and (old.__module__, old.__qualname__) == (
        cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not (replace or rerun):
      raise ValueError(
          f"a method named {cls.name!r} is already registered "
          f"({old.__module__}.{old.__qualname__}); choose another name or "
          "use @register_method(replace=True) to replace it.")
    _REGISTRY[cls.name] = cls
    return cls

  return register if cls is None else register(cls)


register_method(Method)


def method_names() -> tuple[str, ...]:
  """The registered method names (what ``make_method`` and configs accept)."""
  return tuple(sorted(_REGISTRY))


def make_method(name: str, **kwargs: Any) -> Method:
  """Builds a registered method by name, e.g. ``make_method("arl", temperature=8)``.

  Raises:
    ValueError: for an unknown name or a field the method does not have.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: "
                     f"{list(method_names())}.")
  cls = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"method {name!r} has no field(s) {unknown}; its fields "
                     f"are {sorted(fields)}.")
  return cls(**kwargs)




def method_class(name: str) -> type[Method]:
  """The registered class of method ``name`` (its fields: the config's)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: "
                     f"{list(method_names())}.")
  return _REGISTRY[name]
