"""Single device vs pmap(8) vs jit-sharded(8) vs 2 processes x 4 devices."""

import jax
import numpy as np
import parallel_runs as runs
import pytest

from experiments import data_parallel as dp

STEPS = 3
RTOL = 1e-5


def max_rel_diff(a, b):
  """Largest over leaves of max|x - y| / max|y| (relative to the leaf's scale)."""
  def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12))
  return max(jax.tree.leaves(jax.tree.map(rel, a, b)))


@pytest.fixture(scope="module")
def single():
  assert jax.device_count() >= 8, "conftest sets 8 faked CPU devices"
  return runs.run_single(STEPS)


def assert_same(result, reference):
  assert max_rel_diff(result["params"], reference["params"]) < RTOL
  assert max_rel_diff(result["model_state"], reference["model_state"]) < RTOL
  for key in ("loss", "accuracy", "a", "q", "s", "scale", "unimodal_loss"):
    assert max_rel_diff(result["metrics"][key],
                        reference["metrics"][key]) < RTOL, key


def test_pmap_over_8_devices_equals_single_device(single):
  result, (per_device, traces) = runs.run_pmap(STEPS, jax.devices()[:8])
  assert_same(result, single)
  assert traces == 1                          # compiled once for all steps
  for m, values in per_device.items():       # identical on every device
    assert np.all(values == values[0]), m


def test_jit_sharded_over_8_devices_equals_single_device(single):
  result, traces = runs.run_jit(STEPS, jax.devices()[:8])
  assert_same(result, single)
  assert traces == 1                          # compiled once for all steps


def test_two_processes_of_four_devices_equal_single_device(single, tmp_path):
  outputs = dp.launch(2, 4, STEPS, out=str(tmp_path), timeout=240)
  assert all("8 devices (4 local)" in o for o in outputs), outputs
  import pickle
  for i in range(2):
    result = pickle.loads((tmp_path / f"process{i}.pkl").read_bytes())
    assert_same(result, single)


def test_failed_process_is_reported_and_others_stopped(tmp_path):
  # Process 1 dies after joining; process 0 would wait for it forever in the
  # first collective. The launcher must report it and stop process 0.
  import time
  start = time.monotonic()
  with pytest.raises(RuntimeError, match="process 1 exited"):
    dp.launch(2, 2, STEPS, out=str(tmp_path), timeout=120, fail_process=1)
  assert time.monotonic() - start < 110


def test_replicate_keeps_typed_prng_keys():
  from arl_jax import parallel
  tree = {"key": jax.random.key(3), "raw": jax.random.PRNGKey(4),
          "w": np.arange(3.0, dtype=np.float32)}
  n = jax.local_device_count()
  r = parallel.replicate(tree)
  assert jax.dtypes.issubdtype(r["key"].dtype, jax.dtypes.prng_key)
  assert r["key"].shape == (n,) and r["raw"].shape == (n, 2)
  for i in (0, n - 1):
    np.testing.assert_array_equal(jax.random.key_data(r["key"][i]),
                                  jax.random.key_data(tree["key"]))
    np.testing.assert_array_equal(r["w"][i], tree["w"])
  m = parallel.replicate_on_mesh(tree, parallel.data_mesh())
  assert jax.dtypes.issubdtype(m["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(m["key"]),
                                jax.random.key_data(tree["key"]))
  assert m["w"].sharding.is_fully_replicated
