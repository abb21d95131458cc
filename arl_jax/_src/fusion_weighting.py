"""Weights at an additive fusion head; public API: :mod:`arl_jax.fusion_weighting`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arl_jax._src import statistics as stats_lib
from arl_jax._src import validation as _validation
from arl_jax._src.statistics import ModalityStatistics

Array = jax.Array

ADDITIVE_FUSIONS = ("concat", "sum")
WEIGHTINGS = ("inverse_variance", "inverse_error", "calibrated")


def _bias_logits(fused: Array, unimodal: Mapping[str, Array]) -> Array:
  names = _validation.modality_names(unimodal, "unimodal logits")
  total = sum(jnp.asarray(unimodal[m], jnp.float32) for m in names)
  return (total - jnp.asarray(fused, jnp.float32)) / (len(names) - 1)


def weighted_fusion_logits(fused: Array, unimodal: Mapping[str, Array],
                           weights: Mapping[str, Array | float]) -> Array:
  """``p_∅ + sum_m w_m (p_m - p_∅)`` for an additive fusion head.

  Args:
    fused: ``[batch, classes]`` fused logits of an additive head.
    unimodal: ``{modality: [batch, classes]}`` (other modalities zeroed).
    weights: ``{modality: w_m}``; all ones give ``fused`` back.

  Returns:
    ``[batch, classes]`` float32 logits.
  """
  names = _validation.modality_names(unimodal, "unimodal logits")
  _validation.check_same_modalities(names, weights, "fusion weights")
  bias = _bias_logits(fused, unimodal)
  return bias + sum(jnp.asarray(weights[m], jnp.float32)
                    * (jnp.asarray(unimodal[m], jnp.float32) - bias)
                    for m in names)


def additivity_gap(head: Callable[[Mapping[str, Array]], Array],
                   features: Mapping[str, Array]) -> float:
  """How far ``head`` is from additive on ``features`` (0 for an additive one).

  An additive head's fused logits are the sum of the unimodal terms minus
  ``K - 1`` times the logits of all-zero features: ``f(h) = sum_m f(h_m) -
  (K - 1) f(0)``, ``h_m`` keeping modality ``m`` only. Returns the largest
  deviation relative to the largest fused logit (at least 1), computed
  eagerly in float32.
  """
  names = _validation.modality_names(features, "features")
  f32 = {m: jnp.asarray(features[m], jnp.float32) for m in names}
  zero = {m: jnp.zeros_like(v) for m, v in f32.items()}
  fused = jnp.asarray(head(f32), jnp.float32)
  empty = jnp.asarray(head(zero), jnp.float32)
  total = sum(jnp.asarray(head({**zero, m: f32[m]}), jnp.float32)
              for m in names) - (len(names) - 1) * empty
  scale = max(1.0, float(jnp.max(jnp.abs(fused))))
  return float(jnp.max(jnp.abs(fused - total))) / scale


def check_additive(fusion: str | Callable[[Mapping[str, Array]], Array],
                   features: Mapping[str, Array] | None = None, *,
                   rtol: float = 1e-4) -> None:
  """Raises unless a fusion head is additive (fusion weighting's condition).

  Args:
    fusion: a fusion head's name (``"concat"``, ``"sum"``: additive;
      ``"gated"``, ``"film"``: not), or the head itself, ``head({m:
      features}) -> logits`` (a user's own head), checked structurally on
      ``features`` with :func:`additivity_gap`.
    features: ``{modality: [batch, ...]}`` for a head given as a callable
      (random features test the structure; use several rows).
    rtol: the largest relative gap accepted (float32 rounding).
  """
  if isinstance(fusion, str):
    if fusion not in ADDITIVE_FUSIONS:
      raise ValueError(
          f"fusion weighting needs an additive fusion head "
          f"({list(ADDITIVE_FUSIONS)}), whose fused logits are the sum of the "
          f"unimodal logit terms; {fusion!r} fusion mixes the modalities "
          "inside the head, so a weight per unimodal term is not defined "
          "there.")
    return
  if not callable(fusion) or features is None:
    raise TypeError("check_additive takes a fusion name, or a head "
                    "head({modality: features}) -> logits and features=.")
  gap = additivity_gap(fusion, features)
  if not gap <= rtol:
    raise ValueError(
        "fusion weighting needs an additive fusion head: its fused logits "
        "must equal the sum of the unimodal terms minus (K - 1) times the "
        f"logits of all-zero features, but this head's differ by {gap:.3g} "
        f"(relative; tolerance {rtol:g}): it mixes the modalities inside the "
        "head (a gate, FiLM, attention), so a weight per unimodal term is "
        "not defined there.")


def inverse_variance_weights(stats: Mapping[str, ModalityStatistics], *,
                             variance_floor: float = 1e-6
                             ) -> dict[str, Array]:
  """``w_m = K (1/V_m) / sum_j (1/V_j)``, ``V_m`` the true-class variance.

  ``stats`` are held-out sums (:func:`arl_jax.modality_statistics`); the
  weights are those of Eq. 16 for K modalities, scaled so that equal
  variances give ``w = 1`` (the plain model).
  """
  return _inverse_weights(stats, stats_lib.true_class_variance,
                          variance_floor)


def inverse_error_weights(stats: Mapping[str, ModalityStatistics], *,
                          error_floor: float = 1e-6) -> dict[str, Array]:
  """``w_m = K (1/E_m) / sum_j (1/E_j)``, ``E_m = mean (1 - softmax(p_m)[y])^2``.

  As :func:`inverse_variance_weights` with the mean squared error of the
  true-class probability (squared bias plus variance,
  :func:`arl_jax.statistics.true_class_error`) instead of its variance: a
  modality whose predictions sit at the class prior (small variance, large
  error) gets a small weight, not the largest.
  """
  return _inverse_weights(stats, stats_lib.true_class_error, error_floor)


def _inverse_weights(stats, spread, floor: float) -> dict[str, Array]:
  """``w_m = K (1/S_m) / sum_j (1/S_j)``, ``S_m = max(spread(stats[m]),
  floor)``; all ones when any weight is not finite (a modality without rows)."""
  names = _validation.modality_names(stats, "statistics")
  inv = jnp.stack([1.0 / jnp.maximum(spread(stats[m]), floor) for m in names])
  w = len(names) * inv / jnp.sum(inv)
  w = jnp.where(jnp.all(jnp.isfinite(w)), w, 1.0)
  return {m: w[i] for i, m in enumerate(names)}


_jitted_statistics = jax.jit(stats_lib.modality_statistics)


def fusion_weights(kind: str, fused: Array, unimodal: Mapping[str, Array],
                   labels: Array, mask: Array | None = None
                   ) -> dict[str, Array]:
  """One weighting (``WEIGHTINGS``) from held-out logits and labels.

  The one entry point of a held-out fusion weighting in a user's loop: run
  the model in evaluation mode on held-out rows (never the test split), then
  ``w = fusion_weights(kind, fused, unimodal, labels)`` and score
  ``weighted_fusion_logits(fused, unimodal, w)`` on validation to select.

  Args:
    kind: ``"inverse_variance"`` (:func:`inverse_variance_weights`),
      ``"inverse_error"`` (:func:`inverse_error_weights`) or
      ``"calibrated"`` (:func:`fit_fusion_weights`).
    fused, unimodal, labels, mask: the held-out rows' logits of an additive
      head, their labels, and which rows count.

  Returns:
    ``{modality: w_m}``. The scales differ by kind and are what each
    weighting means: the inverse weightings sum to K (equal evidence gives
    the plain model, ``w = 1``); calibrated weights are free per-modality
    temperatures. Only relative to the bias term does a common factor
    matter, so weights of different kinds are not to be compared entry by
    entry.
  """
  if kind not in WEIGHTINGS:
    raise ValueError(f"kind must be one of {list(WEIGHTINGS)}; got {kind!r}.")
  if kind == "calibrated":
    return fit_fusion_weights(fused, unimodal, labels, mask)
  names, batch, classes = _validation.check_logits(unimodal)
  _validation.check_labels(labels, batch, classes)
  _validation.check_mask(mask, batch)
  stats = _jitted_statistics(unimodal, labels, mask)
  if kind == "inverse_variance":
    return inverse_variance_weights(stats)
  return inverse_error_weights(stats)


def fit_fusion_weights(fused: Array, unimodal: Mapping[str, Array],
                       labels: Array, mask: Array | None = None, *,
                       steps: int = 300, learning_rate: float = 0.05
                       ) -> dict[str, Array]:
  """Per-modality weights that maximise the likelihood of held-out rows.

  Minimises the mean cross-entropy of :func:`weighted_fusion_logits` over
  ``log w`` (so ``w > 0``) from ``w = 1`` with Adam, ``steps`` full-batch
  steps (a K-parameter convex-in-practice problem; jitted). Fit on held-out
  rows of the training distribution, never on the test split. Labels
  outside ``[0, C)``, or a mask not of shape ``[batch]``, raise a
  ValueError.

  Returns:
    ``{modality: w_m}``.
  """
  names, batch, classes = _validation.check_logits(unimodal)
  _validation.check_labels(labels, batch, classes)   # values when concrete
  _validation.check_mask(mask, batch)
  labels = jnp.asarray(labels)
  w_rows = (jnp.ones(labels.shape, jnp.float32) if mask is None
            else jnp.asarray(mask, jnp.float32))
  terms = jnp.stack([jnp.asarray(unimodal[m], jnp.float32) for m in names])
  bias = _bias_logits(fused, unimodal)
  terms = terms - bias[None]
  return dict(zip(names, _fit(terms, bias, labels, w_rows, steps,
                              learning_rate)))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fit(terms, bias, labels, w_rows, steps, learning_rate):
  def loss(log_w):
    logits = bias + jnp.einsum("k,kbc->bc", jnp.exp(log_w), terms)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * w_rows) / jnp.maximum(jnp.sum(w_rows), 1.0)

  tx = optax.adam(learning_rate)
  log_w = jnp.zeros(terms.shape[0])

  def body(carry, _):
    log_w, opt = carry
    g = jax.grad(loss)(log_w)
    u, opt = tx.update(g, opt, log_w)
    return (optax.apply_updates(log_w, u), opt), None

  (log_w, _), _ = jax.lax.scan(body, (log_w, tx.init(log_w)), None,
                               length=steps)
  return list(jnp.exp(log_w))



# --------------------------------------------------------------------------
# Held-out fusion weighting in a loop: collect logits, fit, score, select.


class FusionLogits(NamedTuple):
  """Evaluation-mode logits of a set of rows (host arrays).

  ``fused [rows, C]`` (an additive head's), ``unimodal {m: [rows, C]}``
  (the other modalities zeroed) and ``labels [rows]``: every input a
  weighting is fitted on or scored on.
  """
  fused: Any
  unimodal: dict[str, Any]
  labels: Any


class FusionSelection(NamedTuple):
  """What :func:`select_fusion_weighting` chose, and why.

  ``kind``: ``"none"`` (the plain head) or one of ``WEIGHTINGS``;
  ``weights``: its ``{m: w_m}`` (all ones for ``"none"``); ``candidates``:
  every candidate's weights; ``validation_accuracy``: every candidate's
  accuracy on the validation rows, the only thing the choice reads.
  """
  kind: str
  weights: dict[str, float]
  candidates: dict[str, dict[str, float]]
  validation_accuracy: dict[str, float]


def collect_logits(eval_step: Callable, state: Any, batches) -> FusionLogits:
  """Runs ``eval_step(state, batch)`` (:func:`arl_jax.make_eval_step`, or
  any step returning its ``valid``, ``fused_logits``, ``unimodal_logits``
  and ``labels``) over ``batches`` (an iterable) and keeps the counted
  rows, in order, as host arrays."""
  fused, unimodal, labels = [], [], []
  for batch in batches:
    out = jax.device_get(eval_step(state, batch))
    valid = np.asarray(out["valid"], bool)
    fused.append(np.asarray(out["fused_logits"])[valid])
    unimodal.append({m: np.asarray(v)[valid]
                     for m, v in out["unimodal_logits"].items()})
    labels.append(np.asarray(out["labels"])[valid])
  if not fused:
    raise ValueError("collect_logits: the batches are empty.")
  return FusionLogits(np.concatenate(fused),
                      {m: np.concatenate([u[m] for u in unimodal])
                       for m in unimodal[0]},
                      np.concatenate(labels))


def fit_weightings(heldout: FusionLogits, kinds=WEIGHTINGS
                   ) -> dict[str, dict[str, float]]:
  """``{kind: {m: w_m}}``: each weighting of ``kinds`` fitted on the
  held-out rows (:func:`fusion_weights`; never the test split).

  Every weight is on the same scale: the multiplier of modality ``m``'s
  term relative to the plain head (all ones give the fused logits back).
  The inverse weightings also sum to K by construction; the calibrated ones
  are free (their overall size is part of the fit: it sets the weight of
  the shared bias term).
  """
  return {kind: {m: float(np.asarray(v)) for m, v in fusion_weights(
      kind, heldout.fused, heldout.unimodal, heldout.labels).items()}
          for kind in kinds}


def weighted_accuracy(logits: FusionLogits,
                      weights: Mapping[str, Array | float]) -> float:
  """Accuracy of :func:`weighted_fusion_logits` on ``logits``' rows."""
  names = _validation.modality_names(logits.unimodal, "unimodal logits")
  _validation.check_same_modalities(names, weights, "fusion weights")
  predicted = _weighted_argmax(
      logits.fused, {m: logits.unimodal[m] for m in names},
      {m: jnp.asarray(weights[m], jnp.float32) for m in names})
  return float(np.mean(np.asarray(predicted) == np.asarray(logits.labels)))


@jax.jit
def _weighted_argmax(fused, unimodal, weights):
  return jnp.argmax(weighted_fusion_logits(fused, unimodal, weights), -1)


def select_fusion_weighting(heldout: FusionLogits, validation: FusionLogits,
                            kinds=WEIGHTINGS, *, include_plain: bool = True
                            ) -> FusionSelection:
  """Fits each weighting on ``heldout`` and keeps the one of best
  ``validation`` accuracy (ties: the plain head, then ``kinds``' order).

  The held-out rows fit, the validation rows select, the test split is
  never read: score the choice on it afterwards with
  :func:`weighted_accuracy`, or pass ``selection.weights`` to
  ``make_eval_step(...)(state, batch, fusion_weights=...)``.
  """
  names = _validation.modality_names(heldout.unimodal, "unimodal logits")
  candidates = ({"none": dict.fromkeys(names, 1.0)} if include_plain else {})
  candidates.update(fit_weightings(heldout, kinds))
  if not candidates:
    raise ValueError("select_fusion_weighting: no candidate (kinds is empty "
                     "and include_plain is False).")
  accuracy = {k: weighted_accuracy(validation, w)
              for k, w in candidates.items()}
  best = max(candidates, key=lambda k: (accuracy[k],
                                        -list(candidates).index(k)))
  return FusionSelection(best, candidates[best], candidates, accuracy)
