"""A read-only ``{modality: value}`` mapping stored as one stacked array.

The train step reports seven per-modality metrics (``q``, ``s``, ``a``, ...).
As plain dicts they are ``7 K`` separate outputs of the jitted step, each a
device buffer the runtime allocates, hands back and the host wraps: on a small
model that costs more than the statistics themselves. :class:`ModalityValues`
keeps the mapping interface (``metrics["a"]["audio"]``, ``.items()``,
``dict(...)``) but is a pytree with a single leaf whose last axis runs over
the modalities in sorted order, so each metric is one output whatever K is.

Leading axes pass through: stacking the metrics of S steps (``jax.tree.map(
lambda *xs: jnp.stack(xs), *steps)``) or running under ``pmap`` gives a leaf
``[S, K]`` or ``[D, K]`` and ``values["audio"]`` is then ``[S]`` or ``[D]``.
"""

from arl_jax._src.modality_values import ModalityValues
from arl_jax._src.modality_values import as_dicts

__all__ = [
    "ModalityValues",
    "as_dicts",
]
