"""Balancing coefficients, from logits or from batch sums (ARL Eq. 18).

Two forms of each rule:

* from logits, self-contained: :func:`arl_coefficients`,
  :func:`released_arl_coefficients`, :func:`ogm_ge_coefficients`;
* from the per-modality batch sums of :func:`arl_jax.modality_statistics`
  (what :meth:`arl_jax.Method.modulation` receives, already summed over
  devices): :func:`arl_coefficients_from_statistics` and the other
  ``*_from_statistics``. A custom weighting rule starts from these and from
  :mod:`arl_jax.statistics` (``inverse_variance_from_statistics``,
  ``dependency_from_statistics``, ``true_class_variance``)::

    import dataclasses
    import arl_jax
    from arl_jax import coefficients, statistics

    @arl_jax.register_method
    @dataclasses.dataclass(frozen=True)
    class SquaredQ(arl_jax.Method):       # ARL's Eq. 18 with q_m squared
      name = "arl_squared_q"
      gamma: float = 4.0                  # Eq. 22's unimodal losses, as ARL
      warmup_gamma: float = 1.0
      temperature: float = 4.0

      def modulation(self, stats):
        q = statistics.inverse_variance_from_statistics(stats)
        a = coefficients.arl_coefficients_from_statistics(
            stats, self.temperature,
            inverse_variance={m: v ** 2 for m, v in q.items()})
        return arl_jax.Modulation(a, {m: 1.0 + v for m, v in a.items()},
                                  None)

This module is also where the names the top level used to export
(``arl_jax.arl_coefficients_from_statistics`` and its siblings, deprecated
there) live publicly.
"""

from arl_jax._src.coefficients import arl_coefficients
from arl_jax._src.coefficients import arl_coefficients_from_statistics
from arl_jax._src.coefficients import ogm_ge_coefficients
from arl_jax._src.coefficients import ogm_ge_coefficients_from_statistics
from arl_jax._src.coefficients import released_arl_coefficients
from arl_jax._src.coefficients import released_arl_coefficients_from_statistics

__all__ = [
    "arl_coefficients",
    "arl_coefficients_from_statistics",
    "ogm_ge_coefficients",
    "ogm_ge_coefficients_from_statistics",
    "released_arl_coefficients",
    "released_arl_coefficients_from_statistics",
]
