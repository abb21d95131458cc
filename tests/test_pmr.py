"""PMR against an independent float64 NumPy computation.

Linear encoders ``h_m = x_m A_m`` and a linear concat head; the step's
gradient of ``CE(z) + beta CE(-D_a) + lambda CE(-D_v)`` is written out by
hand, in both directions of the switch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_runner import tiny_synthetic

import arl_jax
from arl_jax.methods import pmr
from experiments import train

NAMES = ("audio", "visual")
DIM, WIDTH, CLASSES, ROWS = 4, 3, 3, 24


def apply(params, model_state, inputs, *, train, rng):
  del train, rng
  feats = {m: inputs[m] @ params[m]["A"] for m in NAMES}
  head = lambda f: sum(f[m] @ params["head"][m] for m in NAMES) + params[
      "head"]["bias"]
  fused, unimodal = arl_jax.fused_and_unimodal_logits(head, feats)
  return (fused, unimodal, feats), model_state


def make(seed):
  rng = np.random.default_rng(seed)
  params = {m: {"A": rng.normal(size=(DIM, WIDTH))} for m in NAMES}
  params["head"] = {m: rng.normal(size=(WIDTH, CLASSES)) for m in NAMES}
  params["head"]["bias"] = rng.normal(size=CLASSES)
  x = {m: rng.normal(size=(ROWS, DIM)) for m in NAMES}
  y = np.arange(ROWS) % CLASSES
  return params, x, y


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def oracle(params, x, y, protos, alpha=1.0):
  h = {m: x[m] @ params[m]["A"] for m in NAMES}
  onehot = np.eye(CLASSES)[y]
  dist = {m: np.sqrt(((h[m][:, None] - protos[m][None]) ** 2).sum(-1))
          for m in NAMES}
  prob = {m: _softmax(-dist[m]) for m in NAMES}
  true = {m: prob[m][np.arange(ROWS), y].mean() for m in NAMES}
  rho = true["audio"] / true["visual"]
  weight = {"audio": alpha * (rho < 1), "visual": alpha * (rho > 1)}
  z = sum(h[m] @ params["head"][m] for m in NAMES) + params["head"]["bias"]
  d = (_softmax(z) - onehot) / ROWS
  grads = {"head": {m: h[m].T @ d for m in NAMES}}
  grads["head"]["bias"] = d.sum(0)
  loss = -np.log(_softmax(z)[np.arange(ROWS), y]).mean()
  for m in NAMES:
    # d CE(-D)/d h_i = sum_c -(P_ic - [c = y_i]) (h_i - C_c) / D_ic / B.
    coef = -(prob[m] - onehot) / dist[m] / ROWS                   # [B, C]
    g_h = (coef[:, :, None] * (h[m][:, None] - protos[m][None])).sum(1)
    g_h = weight[m] * g_h + d @ params["head"][m].T
    grads[m] = {"A": x[m].T @ g_h}
    loss += weight[m] * -np.log(prob[m][np.arange(ROWS), y]).mean()
  return grads, rho, weight, loss


def _protos(params, x, y, tight):
  """Class means for the ``tight`` modality, far random points otherwise."""
  rng = np.random.default_rng(5)
  out = {}
  for m in NAMES:
    h = x[m] @ params[m]["A"]
    out[m] = (pmr.class_means(h, y, CLASSES) if m == tight else
              h.mean(0) + 3.0 * rng.normal(size=(CLASSES, WIDTH)))
  return out


@pytest.mark.parametrize("tight", NAMES, ids=["rho>1", "rho<1"])
def test_step_matches_the_oracle_on_both_sides_of_the_switch(tight):
  params, x, y = make(0)
  protos = _protos(params, x, y, tight)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0),
                                    arl_jax.label_modalities(NAMES))
  method = arl_jax.PMR(schedule="warmup")
  state = arl_jax.TrainState.create(
      params=jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params),
      tx=tx, rng=jax.random.PRNGKey(0), method=method, modalities=NAMES)
  state = state.replace(method_state={"prototypes": {
      m: jnp.asarray(v, jnp.float32) for m, v in protos.items()}})
  step = jax.jit(arl_jax.make_train_step(apply, tx, method))
  batch = {"inputs": {m: np.float32(v) for m, v in x.items()},
           "labels": np.int32(y)}
  new, metrics = step(state, batch)
  grads, rho, weight, loss = oracle(params, x, y, protos)
  # The modality whose features sit far from its prototypes is the one
  # pulled: audio when visual is tight (rho < 1), and the other way round.
  assert (rho > 1) == (tight == "audio")
  assert float(metrics["pmr_rho"]) == pytest.approx(rho, rel=1e-4)
  for m in NAMES:
    assert float(metrics["pmr_weight"][m]) == weight[m]
  assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
  got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params,
                     new.params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4,
                                                       atol=1e-6), got, grads)


def test_prototypes_replace_after_epoch_1_and_blend_later():
  method = arl_jax.PMR(fraction=1.0, mu=0.25, schedule="warmup")
  rng = np.random.default_rng(0)
  y = np.array([0, 0, 1, 1, 2, 2])
  feats = [{m: rng.normal(size=(6, 2)) for m in NAMES} for _ in range(3)]
  state = arl_jax.TrainState.create(
      params={m: {"A": jnp.zeros((2, 2))} for m in NAMES}, tx=optax.sgd(0.1),
      rng=jax.random.PRNGKey(0), method=method, modalities=NAMES)
  means = lambda f, m: np.stack([f[m][y == c].mean(0) for c in range(3)])
  for epoch, f in zip((0, 1, 2), feats):
    ctx = arl_jax.EpochContext(modalities=NAMES, num_classes=3,
                               features=lambda split, f=f: (f, y))
    before = state.method_state.get("prototypes")
    state, _ = method.epoch_end(epoch, state, ctx)
    for m in NAMES:
      want = means(f, m)
      if epoch == 2:
        want = 0.75 * want + 0.25 * np.asarray(before[m], np.float64)
      np.testing.assert_allclose(state.method_state["prototypes"][m], want,
                                 rtol=1e-6)
  # A class absent from the rows keeps its prototype.
  kept = pmr.class_means(np.ones((2, 2)), np.array([0, 0]), 3,
                         previous=np.full((3, 2), 7.0))
  np.testing.assert_array_equal(kept, [[1, 1], [7, 7], [7, 7]])


def test_three_modalities_and_missing_prototypes_are_named():
  with pytest.raises(ValueError, match="two modalities"):
    arl_jax.PMR(schedule="warmup").init_state(("a", "b", "c"))
  params, x, y = make(0)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0),
                                    arl_jax.label_modalities(NAMES))
  state = arl_jax.TrainState.create(
      params=jax.tree.map(jnp.asarray, params), tx=tx,
      rng=jax.random.PRNGKey(0), method=arl_jax.PMR(schedule="warmup"),
      modalities=NAMES)
  with pytest.raises(ValueError, match="needs its prototypes"):
    arl_jax.make_train_step(apply, tx, arl_jax.PMR(schedule="warmup"))(
        state, {"inputs": x, "labels": y})


def test_runner_refuses_three_modalities_before_training(tmp_path):
  c = tiny_synthetic(**{"method.name": "pmr"})
  c.data.noise = {"a": 1.0, "b": 2.0, "c": 3.0}
  with pytest.raises(train.ConfigError, match="method 'pmr': PMR is defined "
                     "for two modalities; got 3"):
    train.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_runner_trains_with_prototypes(tmp_path):
  c = tiny_synthetic(epochs=2, **{"method.name": "pmr"})
  report = train.train_and_evaluate(c, tmp_path / "pmr")
  history = [json.loads(l) for l in
             (tmp_path / "pmr" / "metrics.jsonl").read_text().splitlines()]
  assert history[-1]["method"]["prototypes_from_rows"] == 51   # 10% of 512
  assert 0.4 < report["test_accuracy_last"]
