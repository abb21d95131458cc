"""Epoch hooks (PMR, D&R, G-Blending) in a training loop of your own.

:class:`EpochHook` builds a method's :class:`arl_jax.EpochContext` from the
model, the optimiser and the loop's batches, and runs
``method.epoch_end``; :func:`make_fit_copy` and :func:`batch_features` are
its two ingredients. :class:`SeedEpochHooks` runs them for a state stacked
over seeds (G-Blending's copies of every seed in one program). The runner
uses the same classes.
"""

from arl_jax._src.epoch_hooks import COPY_SEED_OFFSET
from arl_jax._src.epoch_hooks import EpochHook
from arl_jax._src.epoch_hooks import SeedEpochHooks
from arl_jax._src.epoch_hooks import batch_features
from arl_jax._src.epoch_hooks import make_fit_copy
from arl_jax._src.epoch_hooks import make_fit_copy_over_seeds

__all__ = ["COPY_SEED_OFFSET", "EpochHook", "SeedEpochHooks", "batch_features",
           "make_fit_copy", "make_fit_copy_over_seeds"]
