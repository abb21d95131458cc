"""OGM-GE (Peng et al., CVPR 2022)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from arl_jax._src import coefficients as coef_lib
from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import register_method


@register_method
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
