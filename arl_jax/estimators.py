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
``heldout_error``           ``1 / mean (1 - softmax(p_m)[y])^2`` on held-out
                            rows: squared bias plus variance of the
                            true-class probability. The variance alone is
                            small for a perfect modality (``p_y`` near 1 on
                            every row) *and* for a useless one (``p_y`` near
                            ``1/C`` on every row); the error is small only
                            for the first
==========================  ================================================

Each may be smoothed over steps by an exponential moving average of the
underlying batch *sums* (``ema``), so data-parallel steps stay exact (sums
are psum'd first) and the average is a weighted mean over rows.
"""

from arl_jax._src.estimators import DEFAULT_VARIANCE_FLOOR
from arl_jax._src.estimators import ESTIMATORS
from arl_jax._src.estimators import ema_update
from arl_jax._src.estimators import inverse_variance
from arl_jax._src.estimators import needs_heldout

__all__ = [
    "DEFAULT_VARIANCE_FLOOR",
    "ESTIMATORS",
    "ema_update",
    "inverse_variance",
    "needs_heldout",
]
