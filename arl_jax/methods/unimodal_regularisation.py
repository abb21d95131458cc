"""Unimodal regularisation (the paper's UR ablation, Table 5)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from arl_jax.methods.base import Method
from arl_jax.methods.base import register_method


@register_method
@dataclasses.dataclass(frozen=True)
class UnimodalRegularisation(Method):
  """The paper's UR ablation (Table 5): unimodal losses, no gradient scaling."""
  name: ClassVar[str] = "unimodal_regularisation"
  gamma: float = 4.0
  warmup_gamma: float = 1.0
