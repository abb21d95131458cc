"""Cheap probes of an optax optimiser, run once on concrete stand-in arrays.

Two questions decide whether ARL's per-modality scales do anything:

* Is the optimiser *affine in its gradient* (SGD, momentum, coupled weight
  decay, clipping below its threshold)? Then a scale on the gradient is a
  scale on the update, exactly the paper's gradient scaling (Eqs. 19-20).
* Or does it normalise per coordinate (Adam, AdamW, Lion, RMSProp,
  Adafactor, sign methods)? Then a constant factor on a gradient leaf
  cancels, and the scale must go after it, as a per-modality step size.

The probes build random stand-ins with the parameters' shapes and dtypes
(so they also work while ``jax.jit`` traces, from abstract values) and run
``init``/``update`` eagerly in a short-lived thread of their own: JAX's
tracing context is per thread, so an enclosing ``jit``/``pmap`` trace (the
train step's first call) cannot capture them, and optax's internal ``jit``
and ``cond`` calls stay concrete.
"""

from arl_jax._src.optimizer_checks import optimizer_is_affine
from arl_jax._src.optimizer_checks import scales_take_effect

__all__ = [
    "optimizer_is_affine",
    "scales_take_effect",
]
