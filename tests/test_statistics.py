import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import arl_jax


def _logits(rng, names, batch, classes, scale=2.0):
  return {m: (scale * rng.normal(size=(batch, classes))).astype(np.float32)
          for m in names}


@pytest.mark.parametrize("names", [("audio", "visual"), ("a", "b", "c")])
@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 3), (64, 6), (33, 34)])
def test_inverse_variance_and_dependency_match_numpy(names, batch, classes):
  rng = np.random.default_rng(batch * classes)
  logits = _logits(rng, names, batch, classes)
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  q = arl_jax.unimodal_inverse_variance(logits)
  s = arl_jax.optimization_dependency(logits, labels)
  assert list(q) == list(names) and list(s) == list(names)
  for m in names:
    np.testing.assert_allclose(q[m], ref.inverse_variance(logits[m]), rtol=1e-5)
    np.testing.assert_allclose(s[m], ref.dependency(logits[m], labels),
                               rtol=1e-5)


def test_entropy_matches_numpy_and_is_zero_when_saturated():
  rng = np.random.default_rng(0)
  z = (5 * rng.normal(size=(16, 5))).astype(np.float32)
  np.testing.assert_allclose(arl_jax.entropy(jnp.asarray(z)), ref.entropy(z),
                             rtol=1e-5, atol=1e-6)
  saturated = jnp.array([[1e4, 0.0, -1e4]])
  assert float(arl_jax.entropy(saturated)[0]) == 0.0


def test_entropy_floor_keeps_q_finite_on_saturated_predictions():
  labels = jnp.array([0, 1, 2, 0])
  saturated = jnp.eye(3)[labels] * 1e4          # entropy underflows to 0
  logits = {"audio": saturated, "visual": saturated * 0.0}
  q = arl_jax.unimodal_inverse_variance(logits)
  assert float(q["audio"]) == pytest.approx(
      1.0 / arl_jax.statistics.DEFAULT_ENTROPY_FLOOR)
  np.testing.assert_allclose(q["visual"], 1.0 / np.log(3.0), rtol=1e-6)
  q = arl_jax.unimodal_inverse_variance(logits, entropy_floor=1e-3)
  assert float(q["audio"]) == pytest.approx(1e3)


def test_mask_and_nonfinite_rows_are_excluded():
  rng = np.random.default_rng(1)
  logits = _logits(rng, ("a", "b"), 8, 4)
  labels = rng.integers(0, 4, size=8).astype(np.int32)
  mask = np.array([True] * 6 + [False] * 2)
  s = arl_jax.optimization_dependency(logits, labels, mask=mask)
  np.testing.assert_allclose(
      s["a"], ref.dependency(logits["a"][:6], labels[:6]), rtol=1e-5)
  bad = dict(logits)
  bad["a"] = logits["a"].copy()
  bad["a"][3, 1] = np.nan
  bad["a"][5, 0] = np.inf
  keep = np.array([i not in (3, 5) for i in range(8)])
  stats = arl_jax.modality_statistics(bad, labels)
  assert float(stats["a"].num_nonfinite) == 2 and float(stats["a"].count) == 6
  np.testing.assert_allclose(stats["a"].true_prob_sum,
                             ref.dependency(logits["a"][keep], labels[keep]),
                             rtol=1e-5)
  q = arl_jax.unimodal_inverse_variance(bad)
  np.testing.assert_allclose(q["a"], ref.inverse_variance(logits["a"][keep]),
                             rtol=1e-5)


def test_statistics_carry_no_gradient():
  rng = np.random.default_rng(2)
  logits = _logits(rng, ("a", "b"), 5, 3)
  labels = jnp.array([0, 1, 2, 1, 0])

  def f(z):
    s = arl_jax.optimization_dependency({"a": z, "b": logits["b"]}, labels)
    q = arl_jax.unimodal_inverse_variance({"a": z, "b": logits["b"]})
    return s["a"] + q["a"]

  g = jax.grad(f)(jnp.asarray(logits["a"]))
  np.testing.assert_array_equal(g, 0.0)


def _numpy_statistics(z, y, rows):
  """float64 oracle of every ModalityStatistics field over ``rows``."""
  z, y = np.asarray(z, np.float64)[rows], np.asarray(y)[rows]
  logp = ref.log_softmax(z)
  p_y = np.exp(logp[np.arange(len(y)), y])
  return {"count": len(y), "entropy_sum": ref.entropy(z).sum(),
          "true_prob_sum": p_y.sum(), "true_prob_sq_sum": (p_y ** 2).sum(),
          "abs_logit_sum": np.abs(z).sum(),
          "correct": (np.argmax(z, -1) == y).sum(),
          "loss_sum": -logp[np.arange(len(y)), y].sum()}


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_every_field_matches_numpy_with_ties_mask_and_nonfinite_rows(names):
  rng = np.random.default_rng(len(names))
  batch, classes = 12, 4
  logits = _logits(rng, names, batch, classes, scale=3.0)
  logits[names[0]][0] = 0.0                    # all classes tie: argmax is 0
  logits[names[1]][1] = [1.0, 2.0, 2.0, 0.0]   # tie between 1 and 2: it is 1
  logits[names[1]][2] = [1e4, 0.0, -1e4, 5.0]  # saturated
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  labels[:3] = [0, 2, 0]
  mask = np.arange(batch) < 10
  logits[names[-1]][4, 3] = np.nan             # drops row 4 everywhere
  logits[names[0]][5, 0] = -np.inf            # drops row 5 everywhere
  logits[names[0]][11, 1] = np.inf             # outside the mask
  rows = mask & (np.arange(batch) != 4) & (np.arange(batch) != 5)
  for fn in (arl_jax.modality_statistics, jax.jit(arl_jax.modality_statistics)):
    stats = fn(logits, labels, mask)
    for m in names:
      want = _numpy_statistics(logits[m], labels, rows)
      for field, value in want.items():
        np.testing.assert_allclose(getattr(stats[m], field), value, rtol=2e-5,
                                   atol=1e-5, err_msg=f"{m}.{field}")
    assert [float(stats[m].num_nonfinite) for m in names] == (
        [1.0, 0.0, 1.0] if len(names) == 3 else [1.0, 1.0])
  fused = logits[names[0]]
  single = arl_jax.statistics.prediction_statistics(fused, labels, mask)
  keep = mask & np.all(np.isfinite(fused), -1)
  for field, value in _numpy_statistics(fused, labels, keep).items():
    np.testing.assert_allclose(getattr(single, field), value, rtol=2e-5,
                               atol=1e-5, err_msg=field)
  assert float(single.num_nonfinite) == 1.0
