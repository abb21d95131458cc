"""Balancing methods, one module per method, each registered by name.

:mod:`arl_jax.methods.base` re-exports the protocol (:class:`Method`,
:class:`Modulation`, the contexts) and the registry
(:func:`register_method`, :func:`make_method`, :func:`method_names`), which
live in ``arl_jax/_src/method_protocol.py``, below the train step;
``concat`` is the base :class:`Method` itself (plain multimodal training).
"""

from arl_jax.methods.agm import AGM
from arl_jax.methods.arl import ARL
from arl_jax.methods.arl import ARLNoResidual
from arl_jax.methods.arl_released import ARLReleased
from arl_jax.methods.arl_released import ARLReleasedApplied
from arl_jax.methods.base import EpochContext
from arl_jax.methods.base import LossContext
from arl_jax.methods.base import Method
from arl_jax.methods.base import Modulation
from arl_jax.methods.base import make_method
from arl_jax.methods.base import method_class
from arl_jax.methods.base import method_names
from arl_jax.methods.base import register_method
from arl_jax.methods.diagnose_relearn import DiagnoseRelearn
from arl_jax.methods.g_blending import GBlending
from arl_jax.methods.mla import MLA
from arl_jax.methods.mmpareto import MMPareto
from arl_jax.methods.ogm_ge import OGMGE
from arl_jax.methods.pmr import PMR
from arl_jax.methods.unimodal_regularisation import UnimodalRegularisation

__all__ = [
    "AGM", "ARL", "ARLNoResidual", "ARLReleased", "ARLReleasedApplied",
    "DiagnoseRelearn", "EpochContext", "GBlending", "LossContext", "MLA", "MMPareto",
    "Method",
    "Modulation", "OGMGE", "PMR", "UnimodalRegularisation", "make_method",
    "method_class", "method_names", "register_method",
]
