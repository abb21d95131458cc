"""Per-modality statistics of unimodal predictions (ARL Sec. 3, Eqs. 4 and 17).

Every quantity ARL and the other balancing rules need is a *sum over
examples*. :func:`modality_statistics` computes those sums once per step;
the estimators below are ratios of them. Keeping sums
rather than means is what lets a data-parallel step add them over devices
(``lax.psum``) and get exactly the global-batch value.

Rows whose logits are not finite (a NaN or Inf anywhere in the row, in any
modality) are left out of every modality's sums and counted in
``num_nonfinite``; they never reach the coefficients.

A new balancing rule starts here: :meth:`arl_jax.Method.modulation` receives
``{modality: ModalityStatistics}`` (already summed over devices), and
:func:`inverse_variance_from_statistics`, :func:`dependency_from_statistics`,
:func:`mean_entropy` and :func:`true_class_variance` read the paper's
quantities from them.
"""

from arl_jax._src.statistics import DEFAULT_ENTROPY_FLOOR
from arl_jax._src.statistics import DEFAULT_SUM_FLOOR
from arl_jax._src.statistics import ModalityStatistics
from arl_jax._src.statistics import dependency_from_statistics
from arl_jax._src.statistics import entropy
from arl_jax._src.statistics import inverse_variance_from_statistics
from arl_jax._src.statistics import mean_entropy
from arl_jax._src.statistics import modality_statistics
from arl_jax._src.statistics import optimization_dependency
from arl_jax._src.statistics import prediction_statistics
from arl_jax._src.statistics import true_class_variance
from arl_jax._src.statistics import unimodal_inverse_variance

__all__ = [
    "DEFAULT_ENTROPY_FLOOR",
    "DEFAULT_SUM_FLOOR",
    "ModalityStatistics",
    "dependency_from_statistics",
    "entropy",
    "inverse_variance_from_statistics",
    "mean_entropy",
    "modality_statistics",
    "optimization_dependency",
    "prediction_statistics",
    "true_class_variance",
    "unimodal_inverse_variance",
]
