"""Inverse-variance estimators; the public API is :mod:`arl_jax.estimators`."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from arl_jax._src import statistics as stats_lib
from arl_jax._src.statistics import ModalityStatistics

Array = jax.Array

ESTIMATORS = ("train_entropy", "heldout_entropy", "heldout_variance",
              "heldout_error")

# Floor on a variance estimate (the probability of the true class lies in
# [0, 1], so its variance is at most 1/4): keeps q finite when held-out
# predictions are all identical.
DEFAULT_VARIANCE_FLOOR = 1e-6


def needs_heldout(estimator: str) -> bool:
  """Whether ``estimator`` reads held-out rows (``batch["heldout"]``)."""
  return estimator.startswith("heldout")


def check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; known: "
                     f"{list(ESTIMATORS)}.")


def inverse_variance(estimator: str,
                     train: Mapping[str, ModalityStatistics],
                     heldout: Mapping[str, ModalityStatistics] | None, *,
                     entropy_floor: float = stats_lib.DEFAULT_ENTROPY_FLOOR,
                     variance_floor: float = DEFAULT_VARIANCE_FLOOR
                     ) -> dict[str, Array]:
  """``{modality: q_m}`` by ``estimator`` (see the module docstring).

  .. math::
    q^{\\mathrm{ent}}_m = 1 / \\max(\\overline{H}_m, \\epsilon_H), \\qquad
    q^{\\mathrm{var}}_m = 1 / \\max(\\overline{p_y^2} - \\overline{p_y}^2,
                                     \\epsilon_V), \\qquad
    q^{\\mathrm{err}}_m = 1 / \\max(\\overline{(1 - p_y)^2}, \\epsilon_V)

  Args:
    estimator: one of :data:`ESTIMATORS`.
    train: statistics of the training batch.
    heldout: statistics of held-out rows (required by ``heldout_*``).
    entropy_floor, variance_floor: floors of the estimates (finite q).

  Returns:
    float32 scalars; NaN for a modality without rows (the coefficient rules
    turn that into neutral coefficients).
  """
  check_estimator(estimator)
  if needs_heldout(estimator) and heldout is None:
    raise ValueError(f"estimator {estimator!r} needs held-out rows: give the "
                     "batch a 'heldout' entry ({'inputs', 'labels', 'mask'}).")
  if estimator == "train_entropy":
    return stats_lib.inverse_variance_from_statistics(train, entropy_floor)
  if estimator == "heldout_entropy":
    return stats_lib.inverse_variance_from_statistics(heldout, entropy_floor)
  spread = (stats_lib.true_class_variance if estimator == "heldout_variance"
            else stats_lib.true_class_error)
  return {m: 1.0 / jnp.maximum(spread(s), variance_floor)
          for m, s in heldout.items()}


def ema_update(average: Mapping[str, ModalityStatistics] | None,
               new: Mapping[str, ModalityStatistics], decay: float | Array,
               started: Array) -> dict[str, ModalityStatistics]:
  """``decay * average + (1 - decay) * new`` of the batch sums.

  Before the first update (``started`` False) the average is ``new``
  itself, so no bias correction is needed; ratios of averaged sums are
  weighted means over the rows seen.
  """
  if average is None:
    return dict(new)
  mix = lambda a, n: jnp.where(started, decay * a + (1.0 - decay) * n, n)
  return {m: jax.tree.map(mix, average[m], new[m]) for m in new}
