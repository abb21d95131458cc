"""ARL as in the paper (Eqs. 17-22), with and without the gradient residual."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from arl_jax._src import coefficients as coef_lib
from arl_jax._src import estimators as estimators_lib
from arl_jax._src import statistics as stats_lib
from arl_jax._src.statistics import ModalityStatistics
from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import register_method

Array = jax.Array


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


@register_method
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
      held-out rows, the quantity of Eqs. 13-16) or ``heldout_error`` (its
      mean squared error against 1: bias squared plus variance, so a
      modality stuck at the class prior is not mistaken for a reliable one).
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
    _check_concrete(self.entropy_floor, "entropy_floor",
                    lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")
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


@register_method
@dataclasses.dataclass(frozen=True)
class ARLNoResidual(ARL):
  """ARL without the gradient residual: encoder gradients times ``a_m``."""
  name: ClassVar[str] = "arl_no_residual"
  residual: bool = False
