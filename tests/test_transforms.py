import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax

PARAMS = {
    "audio": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
    "visual": {"w": jnp.full((3,), 2.0)},
    "head": {"w": jnp.full((4,), -1.0)},
}
LABELS = {"audio": {"w": "audio", "b": "audio"}, "visual": {"w": "visual"},
          "head": {"w": "head"}}


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                            jnp.float32), PARAMS)


def test_scales_exactly_the_labelled_leaves():
  tx = arl_jax.scale_by_modality(LABELS)
  state = tx.init(PARAMS)
  g = _grads()
  out, _ = tx.update(g, state, PARAMS,
                     modality_scales={"audio": 1.25, "visual": 0.5})
  np.testing.assert_allclose(out["audio"]["w"], 1.25 * g["audio"]["w"])
  np.testing.assert_allclose(out["audio"]["b"], 1.25 * g["audio"]["b"])
  np.testing.assert_allclose(out["visual"]["w"], 0.5 * g["visual"]["w"])
  np.testing.assert_array_equal(out["head"]["w"], g["head"]["w"])


def test_callable_labels_and_subset_of_modalities():
  fn = lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()}
  tx = arl_jax.scale_by_modality(fn)
  g = _grads(1)
  out, _ = tx.update(g, tx.init(PARAMS), PARAMS, modality_scales={"visual": 3.0})
  np.testing.assert_allclose(out["visual"]["w"], 3.0 * g["visual"]["w"])
  np.testing.assert_array_equal(out["audio"]["w"], g["audio"]["w"])


# Before an optimiser that is affine in the gradient, the scale is the paper's
# gradient scaling. (Adam-family optimisers cancel a scale put before them:
# tests/test_optimizer_placement.py.)
@pytest.mark.parametrize("make_opt", [
    lambda: optax.sgd(0.1, momentum=0.9),
    lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1)),
])
def test_chains_with_optimisers(make_opt):
  scales = {"audio": 1.7, "visual": 1.1}
  tx = optax.chain(arl_jax.scale_by_modality(LABELS), make_opt())
  ref_tx = make_opt()
  state, ref_state = tx.init(PARAMS), ref_tx.init(PARAMS)
  for step in range(3):
    g = _grads(step)
    scaled = {"audio": jax.tree.map(lambda x: 1.7 * x, g["audio"]),
              "visual": jax.tree.map(lambda x: 1.1 * x, g["visual"]),
              "head": g["head"]}
    u, state = tx.update(g, state, PARAMS, modality_scales=scales)
    ru, ref_state = ref_tx.update(scaled, ref_state, PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, ru)


def test_jit_does_not_recompile_when_scales_change():
  tx = optax.chain(arl_jax.scale_by_modality(LABELS), optax.sgd(0.1))
  traces = []

  @jax.jit
  def step(g, state, scales):
    traces.append(1)
    return tx.update(g, state, PARAMS, modality_scales=scales)

  state = tx.init(PARAMS)
  for i in range(5):
    s = {"audio": jnp.float32(1.0 + i), "visual": jnp.float32(2.0 - 0.1 * i)}
    u, state = step(_grads(i), state, s)
    np.testing.assert_allclose(u["audio"]["b"], -0.1 * (1.0 + i) *
                               _grads(i)["audio"]["b"], rtol=1e-6)
  assert len(traces) == 1


def test_bad_keys_are_named():
  tx = arl_jax.scale_by_modality(LABELS, modalities=("audio", "visual"))
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"missing|keys \['audio'\]"):
    tx.update(_grads(), state, PARAMS, modality_scales={"audio": 1.0})
  tx = arl_jax.scale_by_modality(LABELS)
  with pytest.raises(ValueError, match="depth"):
    tx.update(_grads(), state, PARAMS, modality_scales={"depth": 1.0})
  with pytest.raises(ValueError, match="no label for the parameter at "
                     "'head/w'"):
    arl_jax.scale_by_modality({"audio": "audio"}).update(
        _grads(), state, PARAMS, modality_scales={"audio": 1.0})


def test_gradient_noise_has_the_gradient_std():
  params = {"a": jnp.zeros((200, 100)), "b": jnp.zeros((200, 100))}
  labels = {"a": "a", "b": "b"}
  g = {"a": jax.random.normal(jax.random.PRNGKey(0), (200, 100)) * 3.0,
       "b": jnp.ones((200, 100))}
  tx = arl_jax.scale_by_modality(labels, noise_seed=1)
  state = tx.init(params)
  out, state2 = tx.update(g, state, params, modality_scales={"a": 0.5, "b": 1.0},
                          modality_noise={"a": 1.0, "b": 0.0})
  noise = out["a"] - 0.5 * g["a"]
  assert float(jnp.std(noise)) == pytest.approx(float(jnp.std(g["a"])), rel=0.03)
  np.testing.assert_array_equal(out["b"], g["b"])
  assert not np.array_equal(state.noise_key, state2.noise_key)


def test_partial_of_modality_labels_helper():
  from arl_jax import models
  fn = functools.partial(models.modality_labels, modalities=("audio", "visual"))
  labels = fn(PARAMS)
  assert labels["head"]["w"] == "shared" and labels["audio"]["b"] == "audio"
