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


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_logits_from_partial_sums_match_numpy(names):
  from arl_jax._src.unimodal import logits_from_partial_sums
  rng = np.random.default_rng(len(names))
  terms = {m: rng.normal(size=(5, 4)).astype(np.float32) for m in names}
  bias = rng.normal(size=4).astype(np.float32)
  fused, uni = logits_from_partial_sums(terms, bias)
  t64 = {m: terms[m].astype(np.float64) for m in names}
  np.testing.assert_allclose(fused, sum(t64.values()) + bias, rtol=1e-6,
                             atol=1e-6)
  for m in names:
    np.testing.assert_allclose(uni[m], t64[m] + bias, rtol=1e-6, atol=1e-6)
  # Low-precision terms: summed in float32, returned in their dtype.
  fused16, uni16 = logits_from_partial_sums(
      {m: t.astype(jnp.bfloat16) for m, t in terms.items()}, bias)
  assert fused16.dtype == jnp.bfloat16 and uni16["a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(fused16, np.float32),
                             sum(t64.values()) + bias, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fusion", ["concat", "sum", "shared"])
def test_nan_input_of_one_modality_stays_there_in_the_model(fusion):
  names = ("a", "b", "c")
  model = models.multiview_classifier({m: 3 for m in names}, 4,
                                      encoder_widths=(5,), fusion=fusion)
  x = {m: np.ones((2, 3), np.float32) for m in names}
  params, _ = models.init_model(model, jax.random.PRNGKey(0), x)
  x["b"] = np.full((2, 3), np.nan, np.float32)
  fused, uni = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  assert np.all(np.isnan(uni["b"])) and np.all(np.isnan(fused))
  assert np.all(np.isfinite(uni["a"])) and np.all(np.isfinite(uni["c"]))
