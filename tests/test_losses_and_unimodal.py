import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import arl_jax
from arl_jax import models


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 4.0])
def test_arl_loss_matches_numpy(names, gamma):
  rng = np.random.default_rng(len(names))
  fused = rng.normal(size=(12, 5)).astype(np.float32)
  uni = {m: rng.normal(size=(12, 5)).astype(np.float32) for m in names}
  y = rng.integers(0, 5, 12).astype(np.int32)
  want = ref.cross_entropy(fused, y) + gamma * sum(
      ref.cross_entropy(uni[m], y) for m in names)
  np.testing.assert_allclose(arl_jax.arl_loss(fused, uni, y, gamma), want,
                             rtol=1e-5)
  mask = np.arange(12) < 9
  want = ref.cross_entropy(fused[:9], y[:9]) + gamma * sum(
      ref.cross_entropy(uni[m][:9], y[:9]) for m in names)
  np.testing.assert_allclose(arl_jax.arl_loss(fused, uni, y, gamma, mask=mask),
                             want, rtol=1e-5)


def test_unimodal_logits_are_head_with_others_zeroed():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(7, 3))
  b = rng.normal(size=3)
  feats = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(4, 4))}
  head = lambda f: jnp.concatenate([f["a"], f["b"]], -1) @ w + b
  fused, uni = arl_jax.fused_and_unimodal_logits(head, feats)
  np.testing.assert_allclose(fused, np.concatenate([feats["a"], feats["b"]], -1)
                             @ w + b, rtol=1e-5)
  np.testing.assert_allclose(uni["a"], feats["a"] @ w[:3] + b, rtol=1e-5)
  np.testing.assert_allclose(uni["b"], feats["b"] @ w[3:] + b, rtol=1e-5)


def test_nan_in_one_modality_does_not_leak_into_others():
  feats = {"a": jnp.full((2, 3), jnp.nan), "b": jnp.ones((2, 3))}
  head = lambda f: f["a"] + f["b"]
  _, uni = arl_jax.fused_and_unimodal_logits(head, feats)
  assert np.all(np.isfinite(uni["b"]))


def test_bundled_model_unimodal_logits_equal_zeroed_features():
  names = ("a", "b", "c")
  model = models.MultimodalClassifier(
      encoders={m: models.MLPEncoder((6,)) for m in names},
      head=models.ConcatFusion(4, names))
  rng = np.random.default_rng(1)
  x = {m: rng.normal(size=(5, 3)).astype(np.float32) for m in names}
  params, _ = models.init_model(model, jax.random.PRNGKey(0), x)
  assert set(params) == {"a", "b", "c", "head"}
  fused, uni = model.apply({"params": params}, x)
  w = params["head"]["classifier"]["kernel"]
  b = params["head"]["classifier"]["bias"]
  for i, m in enumerate(names):
    z = models.MLPEncoder((6,)).apply({"params": params[m]}, x[m])
    np.testing.assert_allclose(uni[m], z @ w[6 * i:6 * (i + 1)] + b, rtol=1e-5,
                               atol=1e-6)
  assert fused.shape == (5, 4)
