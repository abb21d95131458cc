"""AGM against an independent float64 NumPy computation.

Linear encoders ``h_m = x_m A_m`` and a linear concat head ``z = sum_m h_m
W_m + b``: a modality's zeroed input gives ``h_m = 0``, so the Shapley
response is ``phi_m = h_m W_m + b / K`` and the gradient of
``CE(sum_m c_m phi_m + (1 - c_m) sg(phi_m))`` is written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax.methods import agm

DIM, WIDTH, CLASSES, ROWS = 4, 3, 3, 16


def make_apply(names):
  def apply(params, model_state, inputs, *, train, rng):
    del train, rng
    feats = {m: inputs[m] @ params[m]["A"] for m in names}
    def head(f):
      return sum(f[m] @ params["head"][m] for m in names) + params["head"]["bias"]
    return arl_jax.fused_and_unimodal_logits(head, feats), model_state
  return apply


def make(names, seed):
  rng = np.random.default_rng(seed)
  params = {m: {"A": rng.normal(size=(DIM, WIDTH))} for m in names}
  params["head"] = {m: rng.normal(size=(WIDTH, CLASSES)) for m in names}
  params["head"]["bias"] = rng.normal(size=CLASSES)
  x = {m: (1.0 + i) * rng.normal(size=(ROWS, DIM))
       for i, m in enumerate(names)}
  y = rng.integers(0, CLASSES, ROWS)
  return params, x, y


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def oracle(params, x, y, running, active, alpha=1.0, clamp=10.0):
  """(gradient, c, s, new running) in float64."""
  names = sorted(x)
  k = len(names)
  h = {m: x[m] @ params[m]["A"] for m in names}
  b = params["head"]["bias"]
  phi = {m: h[m] @ params["head"][m] + b / k for m in names}
  s = {}
  for m in names:
    true = _log_softmax(phi[m])[np.arange(ROWS), y]
    s[m] = np.mean(-np.maximum(true, np.log(1e-8)))
  mean_s = np.mean([s[m] for m in names])
  mean_run = np.mean([running[m] for m in names])
  c = {}
  for m in names:
    r = np.exp(k / (k - 1) * (mean_s - s[m]))
    r_hat = np.exp(k / (k - 1) * (mean_run - running[m]))
    c[m] = np.exp(alpha * min(r_hat - r, clamp)) if active else 1.0
  out = sum(phi.values())
  d = (np.exp(_log_softmax(out)) - np.eye(CLASSES)[y]) / ROWS
  grads = {m: {"A": c[m] * x[m].T @ (d @ params["head"][m].T)} for m in names}
  grads["head"] = {m: c[m] * h[m].T @ d for m in names}
  grads["head"]["bias"] = sum(c[m] for m in names) / k * d.sum(0)
  new_running = {m: s[m] for m in names}     # t = 1: the first score
  return grads, c, s, new_running, out


def _step(names, seed, warmup_steps=0, running=None):
  params, x, y = make(names, seed)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0),
                                    arl_jax.label_modalities(names))
  method = arl_jax.AGM(schedule="warmup")
  state = arl_jax.TrainState.create(
      params=jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params),
      tx=tx, rng=jax.random.PRNGKey(0), method=method, modalities=names)
  if running is not None:
    state = state.replace(method_state={
        **state.method_state,
        "running": {m: jnp.float32(v) for m, v in running.items()},
        "t": jnp.int32(3)})
  step = jax.jit(arl_jax.make_train_step(make_apply(names), tx, method,
                                         warmup_steps=warmup_steps))
  batch = {"inputs": {m: np.float32(v) for m, v in x.items()},
           "labels": np.int32(y)}
  new, metrics = step(state, batch)
  return params, x, y, state, new, metrics


@pytest.mark.parametrize("names", [("audio", "visual"), ("a", "b", "c")],
                         ids=["K=2", "K=3"])
@pytest.mark.parametrize("active", [True, False], ids=["after", "warmup"])
def test_step_gradient_coefficients_and_state_match_the_oracle(names, active):
  # A running score that differs between modalities: c_m != 1.
  running = {m: 0.5 + i for i, m in enumerate(names)}
  params, x, y, state, new, metrics = _step(
      names, 0, warmup_steps=0 if active else 5, running=running)
  grads, c, s, _, out = oracle(params, x, y, running, active)
  got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b,
                     state.params, new.params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4,
                                                       atol=1e-6), got, grads)
  for m in names:
    assert float(metrics["a"][m]) == pytest.approx(c[m], rel=1e-4)
    assert float(metrics["agm_score"][m]) == pytest.approx(s[m], rel=1e-4)
    # S_m <- S_m (t - 1)/t + s_m / t with t = 4 (three earlier steps).
    assert float(new.method_state["running"][m]) == pytest.approx(
        running[m] * 3 / 4 + s[m] / 4, rel=1e-4)
  assert int(new.method_state["t"]) == 4
  if active:
    assert max(abs(v - 1.0) for v in c.values()) > 0.05
  # The forward value is unchanged: the loss is CE of the fused logits.
  fused_ce = np.mean(-_log_softmax(out)[np.arange(ROWS), y])
  assert float(metrics["loss"]) == pytest.approx(fused_ce, rel=1e-5)


def test_shapley_responses_sum_to_the_fused_logits_and_match_k2_official():
  names = ("audio", "visual")
  params, x, _ = make(names, 1)
  p32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  apply = make_apply(names)
  x32 = {m: jnp.asarray(v, jnp.float32) for m, v in x.items()}
  (fused, _), _ = apply(p32, {}, x32, train=False, rng=None)
  forward = lambda inp: apply(p32, {}, inp, train=False, rng=None)[0]
  phi = agm.shapley_responses(fused, forward, x32, names)
  np.testing.assert_allclose(sum(phi.values()), fused, rtol=1e-5, atol=1e-5)
  only_audio = forward({"audio": x32["audio"],
                        "visual": jnp.zeros_like(x32["visual"])})[0]
  only_visual = forward({"audio": jnp.zeros_like(x32["audio"]),
                         "visual": x32["visual"]})[0]
  # Official: m_a = (o - o_not_a + o_not_v) / 2.
  np.testing.assert_allclose(phi["audio"],
                             0.5 * (fused - only_visual + only_audio),
                             rtol=1e-5, atol=1e-5)


def test_first_step_coefficients_use_zero_running_scores():
  names = ("audio", "visual")
  params, x, y, _, new, metrics = _step(names, 2)
  _, c, s, new_running, _ = oracle(params, x, y, {m: 0.0 for m in names},
                                   True)
  for m in names:
    assert float(metrics["a"][m]) == pytest.approx(c[m], rel=1e-4)
    assert float(new.method_state["running"][m]) == pytest.approx(
        new_running[m], rel=1e-4)


@pytest.mark.parametrize("k", [2, 3])
def test_split_model_path_equals_whole_model_passes(k):
  """With ``make_apply_fn`` the zeroed subsets run each encoder once (and a
  row of zeros); the loss, the step's gradients and AGM's state equal those
  of the whole-model passes, BatchNorm (evaluation mode) included."""
  from arl_jax import models
  names = ("a", "b", "c")[:k]
  dims = {"a": 5, "b": 7, "c": 3}
  model = models.MultimodalClassifier(
      encoders={m: models.MLPEncoder((8,), input_dim=dims[m], batch_norm=True)
                for m in names},
      head=models.make_fusion("concat", 4, names))
  rng = np.random.default_rng(k)
  x = {m: rng.normal(size=(12, dims[m])).astype(np.float32) for m in names}
  y = rng.integers(0, 4, 12).astype(np.int32)
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), x)
  split = models.make_apply_fn(model)
  whole = lambda *a, **kw: split(*a, **kw)       # no encode / classify
  results = []
  for apply_fn in (split, whole):
    tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                      arl_jax.label_modalities(names))
    method = arl_jax.AGM(schedule="warmup")
    state = arl_jax.TrainState.create(params=params, tx=tx,
                                      model_state=model_state,
                                      rng=jax.random.PRNGKey(1),
                                      method=method, modalities=names)
    step = jax.jit(arl_jax.make_train_step(apply_fn, tx, method,
                                           check_tx=False))
    for _ in range(2):
      state, metrics = step(state, {"inputs": x, "labels": y})
    results.append((state, metrics))
  (a, ma), (b, mb) = results
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)
  jax.tree.map(close, jax.device_get(a.params), jax.device_get(b.params))
  jax.tree.map(close, jax.device_get(a.method_state),
               jax.device_get(b.method_state))
  close(ma["loss"], mb["loss"])
