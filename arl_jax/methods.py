"""Balancing methods: how each encoder's gradients are scaled, and by how much.

A method is a small frozen dataclass with what the train step needs:

* ``gamma`` / ``warmup_gamma``: the weight of the unimodal cross-entropies in
  the loss (Eq. 22) after and during warm-up;
* ``modulation(stats)``: from the per-modality batch sums of
  :func:`arl_jax.modality_statistics`, the coefficients to report and the
  multiplier applied to each encoder's gradients;
* optionally, persistent state and held-out rows: ``init_state(modalities)``
  (kept in ``TrainState.method_state``), ``needs_heldout`` and
  ``modulate(stats, heldout_stats, state) -> (Modulation, state)``, which by
  default calls ``modulation(stats)``.

The train step never looks at which method it runs, so a new weighting rule is
a new subclass (plus :func:`register_method` to make it reachable by name from
configs); nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arl_jax import coefficients as coef_lib
from arl_jax import estimators as estimators_lib
from arl_jax import statistics as stats_lib
from arl_jax.statistics import ModalityStatistics

Array = jax.Array


class Modulation(NamedTuple):
  """What a method decides for one step, per modality."""
  coefficients: dict[str, Array]   # the method's coefficient (a_m, k_m, ...)
  scales: dict[str, Array]         # multiplier of encoder m's gradients
  noise: dict[str, Array] | None   # std multiplier of gradient noise, or None
  diagnostics: dict[str, Array] = {}   # extra scalar metrics of the step


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

  @property
  def needs_heldout(self) -> bool:
    """Whether every training batch must carry held-out rows."""
    return False

  def init_state(self, modalities) -> Any:
    """The method's persistent state (a pytree; ``()`` if it keeps none)."""
    del modalities
    return ()

  def modulate(self, stats: Mapping[str, ModalityStatistics],
               heldout: Mapping[str, ModalityStatistics] | None,
               state: Any) -> tuple[Modulation, Any]:
    """One step's modulation from the batch (and held-out) sums and state."""
    del heldout
    return self.modulation(stats), state


@dataclasses.dataclass(frozen=True)
class UnimodalRegularisation(Method):
  """The paper's UR ablation (Table 5): unimodal losses, no gradient scaling."""
  name: ClassVar[str] = "unimodal_regularisation"
  gamma: float = 4.0
  warmup_gamma: float = 1.0


@dataclasses.dataclass(frozen=True)
class _SoftmaxRule(Method):
  """Unimodal losses (gamma 4 after warm-up, 1 during) and a temperature T."""
  gamma: float = 4.0
  warmup_gamma: float = 1.0
  temperature: float = 4.0

  def __post_init__(self):
    super().__post_init__()
    _check_concrete(self.temperature, "temperature", lambda v: v > 0, "> 0")

  def _temperature_diagnostics(self) -> dict[str, Array]:
    # A traced temperature (vmap over T) is not checked at construction; the
    # coefficient rules give neutral coefficients for T <= 0 and this flags it.
    bad = jnp.logical_not(jnp.asarray(self.temperature) > 0)
    return {"invalid_temperature": bad.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ARL(_SoftmaxRule):
  """Asymmetric Representation Learning as in the paper (Eqs. 17-22).

  Coefficients ``a_m`` from :func:`arl_jax.arl_coefficients` (Eq. 18); encoder
  ``m``'s gradients are multiplied by ``1 + a_m`` with the gradient residual
  (Eq. 20) or by ``a_m`` without it (``residual=False``, Table 5's "both"
  row).

  Attributes:
    temperature: T (paper: 8 on CREMA-D, 4 on Kinetics-Sounds, AVE, MOSI).
    residual: whether to keep the gradient residual ``g + a_m g``.
    entropy_floor: floor on the mean entropy (see
      :func:`arl_jax.unimodal_inverse_variance`).
    reference: reference modality of the K-modality extension (default: the
      last name in sorted order).
    estimator: how ``q_m`` is estimated (:mod:`arl_jax.estimators`):
      ``train_entropy`` (Eq. 17, the paper), ``heldout_entropy`` or
      ``heldout_variance`` (the variance of the true-class probability on
      held-out rows, the quantity of Eqs. 13-16).
    ema: decay of an exponential moving average of the statistics over steps
      (0: none); the averages live in ``TrainState.method_state``.
    dependency: rows the dependency ``s_m`` (Eq. 4) is read from: ``train``
      (the batch, the paper) or ``heldout``.
  """
  name: ClassVar[str] = "arl"
  residual: bool = True
  entropy_floor: float = stats_lib.DEFAULT_ENTROPY_FLOOR
  reference: str | None = None
  estimator: str = "train_entropy"
  ema: float = 0.0
  dependency: str = "train"

  def __post_init__(self):
    super().__post_init__()
    estimators_lib.check_estimator(self.estimator)
    _check_concrete(self.ema, "ema", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    if self.dependency not in ("train", "heldout"):
      raise ValueError("dependency must be 'train' or 'heldout'; got "
                       f"{self.dependency!r}.")

  @property
  def needs_heldout(self) -> bool:
    return (estimators_lib.needs_heldout(self.estimator)
            or self.dependency == "heldout")

  def init_state(self, modalities):
    if not self.ema:
      return ()
    def empty():   # distinct buffers per leaf (a donated state must not alias)
      return ModalityStatistics(*(jnp.zeros((), jnp.float32)
                                  for _ in ModalityStatistics._fields))
    return {"started": jnp.zeros((), bool),
            "train": {m: empty() for m in sorted(modalities)},
            "heldout": {m: empty() for m in sorted(modalities)}}

  def modulation(self, stats):
    return self.modulate(stats, None, ())[0]

  def modulate(self, stats, heldout, state):
    if self.needs_heldout and heldout is None:
      raise ValueError(
          f"ARL(estimator={self.estimator!r}, dependency="
          f"{self.dependency!r}) needs held-out rows: give each training "
          "batch a 'heldout' entry ({'inputs', 'labels', 'mask'}).")
    if self.ema:
      if not state:
        raise ValueError("ARL(ema=...) keeps state: create the TrainState "
                         "with method=..., modalities=... (or method_state="
                         "method.init_state(modalities)).")
      started = state["started"]
      stats = estimators_lib.ema_update(state["train"], stats, self.ema,
                                        started)
      if heldout is not None:
        heldout = estimators_lib.ema_update(state["heldout"], heldout,
                                            self.ema, started)
      state = {"started": jnp.ones((), bool), "train": stats,
               "heldout": heldout if heldout is not None else state["heldout"]}
    q = estimators_lib.inverse_variance(self.estimator, stats, heldout,
                                        entropy_floor=self.entropy_floor)
    a = coef_lib.arl_coefficients_from_statistics(
        stats, self.temperature, entropy_floor=self.entropy_floor,
        reference=self.reference, inverse_variance=q,
        dependency_stats=heldout if self.dependency == "heldout" else None)
    base = 1.0 if self.residual else 0.0
    diagnostics = {**self._temperature_diagnostics(),
                   "q_estimate": dict(q)}
    return Modulation(a, {m: base + v for m, v in a.items()}, None,
                      diagnostics), state


@dataclasses.dataclass(frozen=True)
class ARLNoResidual(ARL):
  """ARL without the gradient residual: encoder gradients times ``a_m``."""
  name: ClassVar[str] = "arl_no_residual"
  residual: bool = False


@dataclasses.dataclass(frozen=True)
class ARLReleased(_SoftmaxRule):
  """The authors' PyTorch release (see ``ARL_SPEC.md``, last section).

  Coefficients follow the release's formula
  (:func:`arl_jax.released_arl_coefficients`). With ``apply_constant=False``
  encoder ``m``'s gradients are multiplied by ``1 + a_m`` (the rule the
  release computes, applied); with ``apply_constant=True`` by the constant
  ``1 + 0.5`` for every encoder, which is what the release actually applies
  (its computed coefficient is only printed). Defaults follow the release's
  CREMA-D script (gamma 4, T 8 there; set T per data set).
  """
  name: ClassVar[str] = "arl_released"
  apply_constant: bool = False
  constant: float = 0.5

  def modulation(self, stats):
    a = coef_lib.released_arl_coefficients_from_statistics(
        stats, self.temperature)
    applied = ({m: jnp.full((), self.constant, jnp.float32) for m in a}
               if self.apply_constant else a)
    return Modulation(a, {m: 1.0 + v for m, v in applied.items()}, None,
                      self._temperature_diagnostics())


@dataclasses.dataclass(frozen=True)
class ARLReleasedApplied(ARLReleased):
  """What the release really trains with: every encoder gradient times 1.5."""
  name: ClassVar[str] = "arl_released_applied"
  apply_constant: bool = True


@dataclasses.dataclass(frozen=True)
class OGMGE(Method):
  """OGM-GE (Peng et al., CVPR 2022) through the same gradient transformation.

  Encoder ``m``'s gradients are multiplied by ``k_m``
  (:func:`arl_jax.ogm_ge_coefficients`) and, with ``noise=True``, receive
  Gaussian noise of the gradient's own standard deviation (GE). Unlike the
  OGM-GE release, which modulates only 4-D convolution kernels, every leaf
  labelled with the modality is modulated.
  """
  name: ClassVar[str] = "ogm_ge"
  alpha: float = 0.1
  noise: bool = True

  def __post_init__(self):
    super().__post_init__()
    _check_concrete(self.alpha, "alpha", lambda v: v > 0, "> 0")

  def modulation(self, stats):
    k = coef_lib.ogm_ge_coefficients_from_statistics(stats, self.alpha)
    noise = ({m: jnp.ones((), jnp.float32) for m in k} if self.noise else None)
    return Modulation(k, dict(k), noise)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
  """Makes a :class:`Method` subclass reachable by its ``name`` (a decorator)."""
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise ValueError(f"a method named {cls.name!r} is already registered.")
  _REGISTRY[cls.name] = cls
  return cls


for _cls in (Method, UnimodalRegularisation, ARL, ARLNoResidual, ARLReleased,
             ARLReleasedApplied, OGMGE):
  register_method(_cls)


def method_names() -> tuple[str, ...]:
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


