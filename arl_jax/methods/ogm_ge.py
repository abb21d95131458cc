"""OGM-GE (Peng et al., CVPR 2022)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from arl_jax._src import coefficients as coef_lib
from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import _check_concrete
from arl_jax.methods.base import check_window
from arl_jax.methods.base import official_window
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

  Schedule as the official ``main.py``: modulation (scales and noise) in
  epochs ``modulation_starts <= e <= modulation_ends`` (0-based; defaults
  0 and 50 of its 100 epochs), plain training outside;
  ``schedule="warmup"`` uses the train step's warm-up instead.

  Attributes:
    alpha: modulation strength (argparse default 0.1; the CREMA-D setting
      0.8).
    noise: add the GE noise (False: plain OGM).
    schedule: ``"window"`` (official) or ``"warmup"``.
    modulation_starts, modulation_ends: the window's first and last epoch.
  """
  name: ClassVar[str] = "ogm_ge"
  alpha: float = 0.1
  noise: bool = True
  schedule: str = "window"
  modulation_starts: int = 0
  modulation_ends: int = 50

  def __post_init__(self):
    super().__post_init__()
    _check_concrete(self.alpha, "alpha", lambda v: v > 0, "> 0")
    check_window(self)

  def modulation_window(self):
    return official_window(self)

  def modulation(self, stats):
    k = coef_lib.ogm_ge_coefficients_from_statistics(stats, self.alpha)
    noise = ({m: jnp.ones((), jnp.float32) for m in k} if self.noise else None)
    return Modulation(k, dict(k), noise)
