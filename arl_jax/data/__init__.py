"""Data sources returning ``{modality: array}`` inputs and integer labels."""

from arl_jax.data.batching import iterate_batches
from arl_jax.data.synthetic import SyntheticProblem
from arl_jax.data.synthetic import make_linear_gaussian

__all__ = ["SyntheticProblem", "iterate_batches", "make_linear_gaussian"]
