"""Estimators of each modality's inverse variance ``q_m`` for ARL (Eq. 17 and beyond).

ARL's target dependency ratio is the inverse ratio of the modalities'
variances (Eqs. 13-16). The paper estimates ``q_m`` by one pass of
prediction entropy on the training batch (Eq. 17) and names that as its
limitation. On a training batch a modality that memorises its rows becomes
confident there, its entropy collapses and ``q_m`` explodes, although its
predictions on unseen rows are no better; entropy also ignores the label, so
it cannot see a confidently wrong modality. The estimators here:

==========================  ================================================
``train_entropy``           ``1 / mean H(softmax(p_m))`` on the training batch
                            (Eq. 17; the default, reproduces the paper)
``heldout_entropy``         the same on held-out rows (not trained on)
``heldout_variance``        ``1 / Var(softmax(p_m)[y])`` on held-out rows: the
                            variance of the true-class probability, the
                            quantity of Eqs. 13-16 itself
==========================  ================================================

Each may be smoothed over steps by an exponential moving average of the
underlying batch *sums* (``ema``), so data-parallel steps stay exact (sums
are psum'd first) and the average is a weighted mean over rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from arl_jax import statistics as stats_lib
from arl_jax.statistics import ModalityStatistics

Array = jax.Array

ESTIMATORS = ("train_entropy", "heldout_entropy", "heldout_variance")

# Floor on a variance estimate (the probability of the true class lies in
# [0, 1], so its variance is at most 1/4): keeps q finite when held-out
# predictions are all identical.
DEFAULT_VARIANCE_FLOOR = 1e-6


def needs_heldout(estimator: str) -> bool:
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
                                     \\epsilon_V)

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
  return {m: 1.0 / jnp.maximum(stats_lib.true_class_variance(s),
                               variance_floor) for m, s in heldout.items()}


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
