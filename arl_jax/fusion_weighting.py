"""Inverse-variance weighting at the fusion itself (Eqs. 13-16, applied directly).

The theory behind ARL weights the modalities' *predictions*, ``f = sum_m w_m
s_m`` with ``w_m ∝ 1 / Var(s_m)``; ARL applies it only indirectly, through
gradient scales. For an *additive* fusion head (concatenation or sum followed
by a linear classifier) the fused logits are the unimodal logit terms added
up,

.. math::
  p_f = p_\\varnothing + \\sum_m (p_m - p_\\varnothing), \\qquad
  p_\\varnothing = \\frac{\\sum_m p_m - p_f}{K - 1}

(``p_∅``: the head with every modality zeroed, i.e. the bias), so the
weights can be put on those terms directly:

.. math::
  p_f^w = p_\\varnothing + \\sum_m w_m (p_m - p_\\varnothing)

``w = 1`` is the model itself. Two automatic ways to choose ``w``, both from
held-out rows (never the test split):

* :func:`inverse_variance_weights`: ``w_m ∝ 1 / Var(softmax(p_m)[y])``
  (Eq. 16 for K modalities), scaled to sum to K;
* :func:`inverse_error_weights`: ``w_m ∝ 1 / mean (1 - softmax(p_m)[y])^2``
  (squared bias plus variance: a modality stuck at the class prior has a
  small variance but a large error);
* :func:`fit_fusion_weights`: the ``w`` that maximise the held-out
  likelihood of ``softmax(p_f^w)`` (a per-modality temperature: calibration
  of each modality's evidence).

For gated, FiLM or attention fusion the unimodal terms do not add up to
the fused logits, so these weights are not defined there:
:func:`check_additive` says so, from a fusion name or structurally from the
head itself (:func:`additivity_gap`), and ``make_eval_step(...)(state,
batch, fusion_weights=w)`` checks the model's head before it weighs it.

In a loop of your own, the whole held-out procedure is a few lines: run
the eval step over held-out and validation rows (:func:`collect_logits`),
fit every weighting on the held-out rows and keep the one of best
validation accuracy (:func:`select_fusion_weighting`, which also scores
the plain head), then score the choice on test (:func:`weighted_accuracy`).
The runner does exactly this every epoch. One input throughout (logits and
labels, :class:`FusionLogits`) and one weight scale: ``w_m`` multiplies
modality ``m``'s term relative to the plain head.
"""

from arl_jax._src.fusion_weighting import ADDITIVE_FUSIONS
from arl_jax._src.fusion_weighting import WEIGHTINGS
from arl_jax._src.fusion_weighting import FusionLogits
from arl_jax._src.fusion_weighting import FusionSelection
from arl_jax._src.fusion_weighting import additivity_gap
from arl_jax._src.fusion_weighting import check_additive
from arl_jax._src.fusion_weighting import collect_logits
from arl_jax._src.fusion_weighting import fit_fusion_weights
from arl_jax._src.fusion_weighting import fit_weightings
from arl_jax._src.fusion_weighting import fusion_weights
from arl_jax._src.fusion_weighting import inverse_error_weights
from arl_jax._src.fusion_weighting import inverse_variance_weights
from arl_jax._src.fusion_weighting import select_fusion_weighting
from arl_jax._src.fusion_weighting import weighted_accuracy
from arl_jax._src.fusion_weighting import weighted_fusion_logits

__all__ = [
    "ADDITIVE_FUSIONS",
    "WEIGHTINGS",
    "FusionLogits",
    "FusionSelection",
    "additivity_gap",
    "check_additive",
    "collect_logits",
    "fit_fusion_weights",
    "fit_weightings",
    "fusion_weights",
    "inverse_error_weights",
    "inverse_variance_weights",
    "select_fusion_weighting",
    "weighted_accuracy",
    "weighted_fusion_logits",
]
