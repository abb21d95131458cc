"""Balancing coefficients: ARL (Eq. 18), the authors' released rule, OGM-GE.

Each rule maps the per-modality batch sums of :mod:`arl_jax.statistics` to one
coefficient per modality. The ``*_from_statistics`` functions are what the
train step uses (their inputs can be summed over devices first); the
logits-level functions are the public, self-contained form.

All coefficients are computed under ``stop_gradient``: they are constants of
the step. If a modality had no finite unimodal logit in the batch the rules
return neutral coefficients (``1/K`` for the softmax rules, ``1`` for OGM-GE)
instead of NaN, so one bad batch cannot poison the following steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from arl_jax._src import statistics as stats_lib
from arl_jax._src import validation as _validation
from arl_jax._src.statistics import ModalityStatistics

Array = jax.Array


def _stack(values: Mapping[str, Array], names) -> Array:
  return jnp.stack([jnp.asarray(values[m], jnp.float32) for m in names])


def _floored_sums(values: Array, counts: Array, floor: float) -> Array:
  return jnp.maximum(values, floor * jnp.maximum(counts, 1.0))


def _all_present(stats: Mapping[str, ModalityStatistics], names) -> Array:
  return jnp.all(_counts(stats, names) > 0)


def _usable(stats: Mapping[str, ModalityStatistics], names,
            positive: float | Array) -> Array:
  """Every modality has a finite row and the (possibly traced) T or alpha > 0.

  Where this is False the rules return neutral coefficients; a traced
  ``temperature <= 0`` would otherwise silently flip them.
  """
  return _all_present(stats, names) & (jnp.asarray(positive) > 0)


def _prologue(stats: Mapping[str, ModalityStatistics], positive, name: str):
  """What every rule starts with: the modality names (sorted, checked),
  ``positive`` (``temperature`` or ``alpha``) checked > 0 and the
  statistics without gradient."""
  names = _validation.modality_names(stats, "statistics")
  _validation.check_positive(positive, name)
  return names, jax.lax.stop_gradient(dict(stats))


def _counts(stats: Mapping[str, ModalityStatistics], names) -> Array:
  """The finite-row counts, stacked in name order."""
  return _stack({m: stats[m].count for m in names}, names)


def _reference_index(names, reference: str | None) -> int:
  if reference is None:
    return len(names) - 1
  if reference not in names:
    raise ValueError(
        f"reference modality {reference!r} is not one of {list(names)}.")
  return list(names).index(reference)


def arl_coefficients_from_statistics(
    stats: Mapping[str, ModalityStatistics], temperature: float | Array, *,
    entropy_floor: float = stats_lib.DEFAULT_ENTROPY_FLOOR,
    sum_floor: float = stats_lib.DEFAULT_SUM_FLOOR,
    reference: str | None = None,
    inverse_variance: Mapping[str, Array] | None = None,
    dependency_stats: Mapping[str, ModalityStatistics] | None = None,
) -> dict[str, Array]:
  """ARL coefficients (Eq. 18, extended to K modalities) from batch sums.

  See :func:`arl_coefficients` for the formula. By default ``q_m`` is Eq. 17
  on ``stats`` and ``s_m`` Eq. 4 on ``stats``; ``inverse_variance`` replaces
  the former (another estimator, :mod:`arl_jax.estimators`) and
  ``dependency_stats`` the rows the latter is read from.
  """
  names, stats = _prologue(stats, temperature, "temperature")
  if inverse_variance is None:
    inverse_variance = stats_lib.inverse_variance_from_statistics(
        stats, entropy_floor)
  dep = jax.lax.stop_gradient(dict(dependency_stats or stats))
  q = _stack(jax.lax.stop_gradient(dict(inverse_variance)), names)
  counts = _counts(dep, names)
  s = _floored_sums(_stack(stats_lib.dependency_from_statistics(dep), names),
                    counts, sum_floor)
  q_share = q / jnp.sum(q)
  s_share = s / jnp.sum(s)
  r = _reference_index(names, reference)
  # z_m = T (q^_m - s^_m) / (2 q^_r s^_r). At K = 2, z_0 - z_1 = T (q0/q1 - s0/s1).
  logits = temperature * (q_share - s_share) / (2.0 * q_share[r] * s_share[r])
  a = jax.nn.softmax(logits)
  usable = (_usable(stats, names, temperature) & _all_present(dep, names)
            & jnp.all(jnp.isfinite(q)))
  a = jnp.where(usable, a, 1.0 / len(names))
  return {m: a[i] for i, m in enumerate(names)}


def arl_coefficients(logits: Mapping[str, Array], labels: Array,
                     temperature: float | Array, *, mask: Array | None = None,
                     entropy_floor: float = stats_lib.DEFAULT_ENTROPY_FLOOR,
                     reference: str | None = None) -> dict[str, Array]:
  """Asymmetric-learning coefficients of ARL (Eq. 18).

  Two modalities (``m0`` and ``m1`` in sorted name order, the order JAX gives
  dict keys, so that eager, ``jit`` and the train step agree):

  .. math::
    [a_0, a_1] = \\mathrm{softmax}\\big([\\,T\\,q_0/q_1,\\ T\\,s_0/s_1\\,]\\big)

  with ``q_m`` the inverse variance (Eq. 17, :func:`unimodal_inverse_variance`)
  and ``s_m`` the optimisation dependency (Eq. 4,
  :func:`optimization_dependency`). When the dependency ratio ``s0/s1`` is
  below its target ``q0/q1``, ``a_0`` grows and encoder 0 is pushed harder.

  **K modalities (this library's extension).** With the shares
  ``q^_m = q_m / sum_j q_j`` and ``s^_m = s_m / sum_j s_j``:

  .. math::
    a = \\mathrm{softmax}_m\\Big(T\\,\\frac{\\hat q_m - \\hat s_m}
        {2\\,\\hat q_r\\,\\hat s_r}\\Big)

  where ``r`` is the reference modality (default: the last one). Since
  ``q0/q1 - s0/s1 = (q^_0 - s^_0) / (q^_1 s^_1)`` and ``q^_1 - s^_1 =
  -(q^_0 - s^_0)`` when K = 2, the two softmax logits differ by exactly
  ``T (q0/q1 - s0/s1)``: this *is* Eq. 18 at K = 2. For any K the largest
  coefficient goes to the modality whose dependency share is furthest below
  its inverse-variance share (largest ``q^_m - s^_m``). Eq. 18 is itself not
  symmetric in the two modalities (swapping them changes the coefficients);
  the reference modality is where that asymmetry lives, as in the paper.

  Args:
    logits: ``{modality: [batch, classes]}`` unimodal logits, K >= 2.
    labels: ``[batch]`` integer labels.
    temperature: ``T > 0`` (paper: 8 on CREMA-D, 4 elsewhere).
    mask: optional ``[batch]`` boolean of rows to use.
    entropy_floor: floor on the mean entropy, see
      :func:`unimodal_inverse_variance`.
    reference: the modality ``r`` above (default: the last name in sorted
      order).

  Returns:
    ``{modality: a_m}``, summing to 1, without gradient. Rows with NaN/Inf
    logits or (under ``jit``) a label outside ``[0, C)`` are excluded; if a
    modality has no usable row, or a traced ``temperature`` is not > 0, the
    coefficients are ``1/K`` (no preference).
  """
  stats = stats_lib.modality_statistics(logits, labels, mask)
  return arl_coefficients_from_statistics(
      stats, temperature, entropy_floor=entropy_floor, reference=reference)


RELEASED_ENTROPY_CLAMP = 0.3


def released_arl_coefficients_from_statistics(
    stats: Mapping[str, ModalityStatistics], temperature: float | Array, *,
    entropy_floor: float = stats_lib.DEFAULT_ENTROPY_FLOOR,
    sum_floor: float = stats_lib.DEFAULT_SUM_FLOOR,
    entropy_clamp: float = RELEASED_ENTROPY_CLAMP) -> dict[str, Array]:
  """The coefficient rule of the authors' PyTorch release (not the paper's).

  The release uses the mean absolute logit as the dependency and a clamped,
  normalised entropy:

  .. math::
    \\tilde q_m = 1 / \\max(H_m / \\textstyle\\sum_j H_j,\\ 0.3), \\quad
    \\hat q_m = \\tilde q_m / \\textstyle\\sum_j \\tilde q_j, \\quad
    \\hat d_m = \\frac{\\sum_c \\mathrm{mean}_i |p_{m,i,c}|}
                     {\\sum_j \\sum_c \\mathrm{mean}_i |p_{j,i,c}|}

  and for two modalities ``[a_0, a_1] = softmax([T q^_0 d^_1, T q^_1 d^_0])``.
  K modalities: ``a = softmax_m(T q^_m (1 - d^_m))``, which is the same
  expression at K = 2 because ``1 - d^_0 = d^_1``.

  The release computes this on the host every step and only prints it; what
  it applies is the constant ``0.5`` (see :class:`arl_jax.methods.ARLReleased`).
  """
  names, stats = _prologue(stats, temperature, "temperature")
  counts = _counts(stats, names)
  h = _stack({m: stats_lib.mean_entropy(stats[m], entropy_floor)
              for m in names}, names)
  q = 1.0 / jnp.maximum(h / jnp.sum(h), entropy_clamp)
  q_share = q / jnp.sum(q)
  dep = _floored_sums(_stack({m: stats[m].abs_logit_sum for m in names}, names),
                      counts, sum_floor) / jnp.maximum(counts, 1.0)
  dep_share = dep / jnp.sum(dep)
  a = jax.nn.softmax(temperature * q_share * (1.0 - dep_share))
  a = jnp.where(_usable(stats, names, temperature), a, 1.0 / len(names))
  return {m: a[i] for i, m in enumerate(names)}


def released_arl_coefficients(logits: Mapping[str, Array], labels: Array,
                              temperature: float | Array, *,
                              mask: Array | None = None) -> dict[str, Array]:
  """The release's rule from logits; see
  :func:`released_arl_coefficients_from_statistics`."""
  stats = stats_lib.modality_statistics(logits, labels, mask)
  return released_arl_coefficients_from_statistics(stats, temperature)


def ogm_ge_coefficients_from_statistics(
    stats: Mapping[str, ModalityStatistics], alpha: float | Array, *,
    sum_floor: float = stats_lib.DEFAULT_SUM_FLOOR) -> dict[str, Array]:
  """OGM-GE modulation coefficients (Peng et al., CVPR 2022, Eqs. 9-10).

  .. math::
    \\rho_m = \\frac{s_m}{\\frac{1}{K-1}\\sum_{j \\ne m} s_j}, \\qquad
    k_m = \\begin{cases} 1 - \\tanh(\\alpha\\,\\rho_m) & \\rho_m > 1 \\\\
                         1 & \\text{otherwise} \\end{cases}

  with ``s_m`` the batch sum of the true-class probability (Eq. 4 here). At
  K = 2 the denominator is the other modality's score, the paper's
  discrepancy ratio ``rho^a = s^a / s^v``: the dominant modality's gradient is
  damped, the other is left as is. The encoder gradient becomes ``k_m g``.
  The paper's generalisation enhancement (GE) adds Gaussian noise to that
  gradient; :func:`arl_jax.scale_by_modality` does it when given
  ``modality_noise``.

  References:
    Peng, Wei, Deng, Wang, Hu. "Balanced Multimodal Learning via On-the-fly
    Gradient Modulation". CVPR 2022 (arXiv:2203.15332).
  """
  names, stats = _prologue(stats, alpha, "alpha")
  counts = _counts(stats, names)
  s = _floored_sums(_stack({m: stats[m].true_prob_sum for m in names}, names),
                    counts, sum_floor)
  others = (jnp.sum(s) - s) / (len(names) - 1)
  rho = s / others
  k = jnp.where(rho > 1.0, 1.0 - jnp.tanh(alpha * rho), 1.0)
  k = jnp.where(_usable(stats, names, alpha), k, 1.0)
  return {m: k[i] for i, m in enumerate(names)}


def ogm_ge_coefficients(logits: Mapping[str, Array], labels: Array,
                        alpha: float | Array, *, mask: Array | None = None
                        ) -> dict[str, Array]:
  """OGM-GE coefficients from logits; see
  :func:`ogm_ge_coefficients_from_statistics`."""
  stats = stats_lib.modality_statistics(logits, labels, mask)
  return ogm_ge_coefficients_from_statistics(stats, alpha)
