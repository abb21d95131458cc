"""Per-modality batch sums; public API: :mod:`arl_jax.statistics`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from arl_jax._src import validation as _validation

Array = jax.Array

# Mean entropies below this are treated as this value (nats). In float32 a
# prediction whose top probability is 1 - eps (eps = 1.2e-7, the float32
# resolution near 1) has entropy ~2e-6, so entropies below 1e-6 are not
# resolved anyway; the floor keeps q = 1 / H finite (<= 1e6) when a unimodal
# prediction saturates and its entropy underflows to exactly 0.
DEFAULT_ENTROPY_FLOOR = 1e-6

# Per-example floor on probability sums (true-class sums, |logit| sums) used
# wherever they divide: a batch sum below ``count * 1e-6`` is raised to it.
DEFAULT_SUM_FLOOR = 1e-6


class ModalityStatistics(NamedTuple):
  """Batch sums over the finite rows of one modality's unimodal logits."""
  count: Array            # number of finite rows
  entropy_sum: Array      # sum_i H(softmax(p_i))
  true_prob_sum: Array    # sum_i softmax(p_i)[y_i]            (Eq. 4 terms)
  true_prob_sq_sum: Array  # sum_i softmax(p_i)[y_i]^2  (its variance, Eq. 13)
  abs_logit_sum: Array    # sum_i sum_c |p_ic|   (the release's "dependency")
  correct: Array          # sum_i [argmax p_i == y_i]
  loss_sum: Array         # sum_i CE(p_i, y_i)
  num_nonfinite: Array    # rows with a NaN/Inf logit (excluded above)


def entropy(logits: Array) -> Array:
  """Softmax entropy of each row, ``H(p) = -sum_c p_c log p_c`` (nats).

  Computed from ``log_softmax`` so that saturated rows give exactly 0 rather
  than ``0 * -inf = NaN``.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _row_sums(logits: Array, labels: Array, rows: Array,
              in_batch: Array) -> Array:
  """Batch sums of every :class:`ModalityStatistics` field, in one reduction.

  ``logits``: ``[..., batch, classes]``; ``labels``: ``[batch]`` in
  ``[0, C)``; ``rows``: ``[..., batch]`` bool, the rows that count;
  ``in_batch``: ``[batch]`` bool, rows that count for ``num_nonfinite``.
  With ``d = x - max_c x_c``, ``S = sum_c exp(d_c)``:

  .. math::
    \\log p_y = d_y - \\log S, \\qquad
    H = \\log S - \\tfrac{1}{S}\\sum_c e^{d_c} d_c

  (the entropy of ``softmax(x)``, exactly 0 for a saturated row), and the
  prediction is the first index where ``d_c = 0`` (``argmax``). Every per-row
  term is selected by ``rows`` with ``where`` (never multiplied), so a row
  with a NaN or Inf contributes exact zeros. Returns ``[..., 8]`` sums in
  the field order of :class:`ModalityStatistics`.
  """
  x = jax.lax.stop_gradient(logits).astype(jnp.float32)
  num_classes = x.shape[-1]
  finite = jnp.all(jnp.isfinite(x), axis=-1)
  d = x - jnp.max(x, axis=-1, keepdims=True)
  e = jnp.exp(d)
  total = jnp.sum(e, axis=-1)
  log_total = jnp.log(total)
  classes = jnp.arange(num_classes, dtype=labels.dtype)
  is_label = labels[:, None] == classes
  true_logp = jnp.sum(jnp.where(is_label, d, 0.0), axis=-1) - log_total
  first_max = jnp.min(jnp.where(d == 0.0, classes, num_classes), axis=-1)
  terms = (
      jnp.ones_like(total),                                   # count
      log_total - jnp.sum(e * d, axis=-1) / total,            # entropy
      jnp.exp(true_logp),                                     # p_y
      jnp.exp(2.0 * true_logp),                               # p_y^2
      jnp.sum(jnp.abs(x), axis=-1),                           # sum_c |x_c|
      (first_max == labels).astype(jnp.float32),              # correct
      -true_logp,                                             # CE
  )
  per_row = [jnp.where(rows, t, 0.0) for t in terms]
  per_row.append((~finite & in_batch).astype(jnp.float32))   # num_nonfinite
  return jnp.sum(jnp.stack(per_row, axis=-2), axis=-1)


def _label_rows(labels: Array, num_classes: int, mask: Array | None
                ) -> tuple[Array, Array]:
  """(rows in the batch with a label in ``[0, C)``, labels clipped into it)."""
  # Under jit labels are not checked: a label outside [0, C) drops its row.
  in_batch = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    in_batch = in_batch & jnp.asarray(mask, bool)
  return in_batch, jnp.clip(labels, 0, num_classes - 1)


def prediction_statistics(logits: Array, labels: Array,
                          mask: Array | None = None) -> ModalityStatistics:
  """Batch sums of one ``[batch, classes]`` prediction (see the module doc)."""
  if jnp.ndim(logits) != 2:
    raise ValueError(f"logits must have shape [batch, classes]; got shape "
                     f"{jnp.shape(logits)}.")
  in_batch, labels = _label_rows(jnp.asarray(labels), jnp.shape(logits)[-1],
                                 mask)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  sums = _row_sums(logits, labels, finite & in_batch, in_batch)
  return ModalityStatistics(*(sums[i] for i in range(len(sums))))


def modality_statistics(logits: Mapping[str, Array], labels: Array,
                        mask: Array | None = None
                        ) -> dict[str, ModalityStatistics]:
  """Sufficient statistics of each modality's unimodal predictions.

  Args:
    logits: ``{modality: [batch, classes]}`` unimodal logits.
    labels: ``[batch]`` integer class labels.
    mask: optional ``[batch]`` boolean; False rows (padding) are ignored.

  Returns:
    ``{modality: ModalityStatistics}`` of batch sums, carrying no gradient.
  """
  names, batch, classes = _validation.check_logits(logits)
  _validation.check_labels(labels, batch, classes)
  _validation.check_mask(mask, batch)
  # One batched computation over a [K, batch, classes] stack, all fields
  # summed by one reduction (few large ops rather than K * 8 small ones). A
  # row with a non-finite logit in any modality is dropped from every
  # modality, so that all sums (and ratios of sums) cover the same examples.
  stacked = jnp.stack([jnp.asarray(logits[m]) for m in names])
  in_batch, labels = _label_rows(jnp.asarray(labels), classes, mask)
  rows = jnp.all(jnp.isfinite(stacked), axis=(0, 2)) & in_batch
  sums = _row_sums(stacked, labels, rows, in_batch)              # [K, 8]
  return {m: ModalityStatistics(*(sums[i, j] for j in range(sums.shape[1])))
          for i, m in enumerate(names)}


def mean_entropy(stats: ModalityStatistics,
                 entropy_floor: float = DEFAULT_ENTROPY_FLOOR) -> Array:
  """``max(mean_i H_i, entropy_floor)``; NaN when the batch had no finite row."""
  mean = stats.entropy_sum / jnp.where(stats.count > 0, stats.count, jnp.nan)
  return jnp.maximum(mean, entropy_floor)


def inverse_variance_from_statistics(
    stats: Mapping[str, ModalityStatistics],
    entropy_floor: float = DEFAULT_ENTROPY_FLOOR) -> dict[str, Array]:
  """Eq. 17 from batch sums: ``q_m = 1 / max(mean_i H(softmax(p_m,i)), floor)``."""
  return {m: 1.0 / mean_entropy(s, entropy_floor) for m, s in stats.items()}


def true_class_variance(stats: ModalityStatistics) -> Array:
  """``Var_i(softmax(p_i)[y_i])`` over the rows of ``stats`` (NaN if none).

  The variance of the true-class probability, the quantity whose inverse
  weights the modalities in Eqs. 13-16 (``w_m ∝ 1 / Var(s_m)``), as
  ``E[p_y^2] - E[p_y]^2`` from the batch sums (clamped at 0 against
  rounding).
  """
  count = jnp.where(stats.count > 0, stats.count, jnp.nan)
  mean = stats.true_prob_sum / count
  return jnp.maximum(stats.true_prob_sq_sum / count - mean * mean, 0.0)


def true_class_error(stats: ModalityStatistics) -> Array:
  """``E_i[(1 - softmax(p_i)[y_i])^2]`` over the rows of ``stats`` (NaN if none).

  The mean squared error of the true-class probability against 1: its
  squared bias ``(1 - E[p_y])^2`` plus its variance ``Var(p_y)``. Unlike the
  variance alone it is small only for a modality that is right *and*
  confident: a useless modality whose ``p_y`` sits at the class prior on
  every row has a small variance but an error near ``(1 - 1/C)^2``.
  """
  count = jnp.where(stats.count > 0, stats.count, jnp.nan)
  mse = (count - 2.0 * stats.true_prob_sum + stats.true_prob_sq_sum) / count
  return jnp.maximum(mse, 0.0)


def dependency_from_statistics(stats: Mapping[str, ModalityStatistics]
                               ) -> dict[str, Array]:
  """Eq. 4 terms from batch sums: ``s_m = sum_i softmax(p_m,i)[y_i]``."""
  return {m: s.true_prob_sum for m, s in stats.items()}


def unimodal_inverse_variance(
    logits: Mapping[str, Array], *, mask: Array | None = None,
    entropy_floor: float = DEFAULT_ENTROPY_FLOOR) -> dict[str, Array]:
  """Inverse variance of each modality's prediction (ARL Eq. 17).

  .. math::
    q_m = \\frac{1}{\\max\\big(\\tfrac{1}{B}\\sum_i H(\\mathrm{softmax}(p_{m,i})),
          \\ \\epsilon\\big)}, \\qquad H(p) = -\\sum_c p_c \\log p_c

  The single-pass entropy of the unimodal prediction is the paper's proxy for
  the variance of that modality's estimate.

  Args:
    logits: ``{modality: [batch, classes]}`` unimodal logits (K >= 2).
    mask: optional ``[batch]`` boolean of rows to use.
    entropy_floor: ``epsilon`` above (nats, default 1e-6). Saturated
      predictions have entropy that underflows to 0; the floor keeps q finite
      (at most ``1 / entropy_floor``) and hence the coefficients finite.

  Returns:
    ``{modality: q_m}`` float32 scalars, no gradient. Rows with a NaN/Inf
    logit are excluded; a modality with no finite row gives NaN (the
    coefficient functions turn that into neutral coefficients).
  """
  names, batch, _ = _validation.check_logits(logits)
  _validation.check_mask(mask, batch)
  labels = jnp.zeros((batch,), jnp.int32)  # unused by the entropy sums
  stats = modality_statistics(logits, labels, mask)
  return inverse_variance_from_statistics(stats, entropy_floor)


def optimization_dependency(logits: Mapping[str, Array], labels: Array, *,
                            mask: Array | None = None) -> dict[str, Array]:
  """Optimisation dependency terms of ARL Eq. 4 (as in OGM-GE).

  .. math:: s_m = \\sum_i \\mathrm{softmax}(p_{m,i})_{y_i}

  the batch sum of each modality's unimodal probability of the true class; the
  dependency ratio of two modalities is ``d = s_0 / s_1``.

  Returns:
    ``{modality: s_m}`` float32 scalars, no gradient; rows with a NaN/Inf logit
    are excluded.
  """
  stats = modality_statistics(logits, labels, mask)
  return dependency_from_statistics(stats)

