"""Seeds in one program at K = 3: each seed equals its one-seed run, for
every method defined for three modalities (PMR is not: two only)."""

import pytest
from test_seeds import check_method

import arl_jax

METHODS = [m for m in arl_jax.method_names() if m != "pmr"]


@pytest.mark.parametrize("method", METHODS)
def test_each_seed_equals_its_one_seed_run_k3(method, tmp_path):
  check_method(method, 3, tmp_path)
