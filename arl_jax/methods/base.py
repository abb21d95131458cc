"""The method protocol and registry (re-exported from
:mod:`arl_jax._src.method_protocol`, where the train step reads it).

The protocol lives below the train step, as optax keeps its
``GradientTransformation`` in ``optax._src.base``: the core imports nothing
above it, and each method module here builds on it. See
:mod:`arl_jax._src.method_protocol` for what a method provides.
"""

from arl_jax._src.method_protocol import SCHEDULES
from arl_jax._src.method_protocol import EpochContext
from arl_jax._src.method_protocol import LossContext
from arl_jax._src.method_protocol import Method
from arl_jax._src.method_protocol import Modulation
from arl_jax._src.method_protocol import _check_concrete  # noqa: F401 (methods' helper)
from arl_jax._src.method_protocol import check_window
from arl_jax._src.method_protocol import make_method
from arl_jax._src.method_protocol import method_class
from arl_jax._src.method_protocol import method_names
from arl_jax._src.method_protocol import official_window
from arl_jax._src.method_protocol import register_method

__all__ = [
    "SCHEDULES", "EpochContext", "LossContext", "Method", "Modulation",
    "check_window", "make_method", "method_class", "method_names",
    "official_window", "register_method",
]
