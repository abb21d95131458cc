"""The authors' PyTorch release of ARL: its rule, and what it really applies."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from arl_jax._src import coefficients as coef_lib
from arl_jax.methods.arl import _SoftmaxRule
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import register_method


@register_method
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


@register_method
@dataclasses.dataclass(frozen=True)
class ARLReleasedApplied(ARLReleased):
  """What the release really trains with: every encoder gradient times 1.5."""
  name: ClassVar[str] = "arl_released_applied"
  apply_constant: bool = True
