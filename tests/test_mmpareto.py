"""MMPareto against an independent float64 NumPy computation.

The model: tanh encoders ``h_m = tanh(x_m A_m + c_m)`` (two tensors each, so
the per-tensor rescale is exercised) and a linear concat head ``z = [h_a;
h_v] W + b``; unimodal logits ``z_m = h_m W_m + b`` (the other modality
zeroed). Every gradient below is written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax.methods import mmpareto

NAMES = ("audio", "visual")
DIM, WIDTH, CLASSES, ROWS = 4, 3, 3, 16


def apply(params, model_state, inputs, *, train, rng):
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]["A"] + params[m]["c"])
           for m in NAMES}
  def head(f):
    z = jnp.concatenate([f[m] for m in NAMES], axis=-1)
    return z @ params["head"]["W"] + params["head"]["b"]
  return arl_jax.fused_and_unimodal_logits(head, feats), model_state


def make(seed):
  rng = np.random.default_rng(seed)
  params = {m: {"A": rng.normal(size=(DIM, WIDTH)),
                "c": 0.1 * rng.normal(size=WIDTH)} for m in NAMES}
  params["head"] = {"W": rng.normal(size=(2 * WIDTH, CLASSES)),
                    "b": 0.1 * rng.normal(size=CLASSES)}
  x = {m: rng.normal(size=(ROWS, DIM)) for m in NAMES}
  y = rng.integers(0, CLASSES, ROWS)
  return params, x, y


# ----------------------------------------------------------------- oracle --

def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def per_loss_gradients(params, x, y):
  """{"fused": g, m: g} in float64, by hand."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in params.items()}
  h = {m: np.tanh(x[m] @ p[m]["A"] + p[m]["c"]) for m in NAMES}
  W, b = p["head"]["W"], p["head"]["b"]
  rows = {m: slice(i * WIDTH, (i + 1) * WIDTH) for i, m in enumerate(NAMES)}
  onehot = np.eye(CLASSES)[y]

  def zeros():
    return {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in p.items()}

  def encoder(g, m, dh):
    pre = dh * (1 - h[m] ** 2)
    g[m]["A"] = x[m].T @ pre
    g[m]["c"] = pre.sum(0)

  out = {}
  H = np.concatenate([h[m] for m in NAMES], -1)
  d = (_softmax(H @ W + b) - onehot) / ROWS
  g = zeros()
  g["head"]["W"], g["head"]["b"] = H.T @ d, d.sum(0)
  for m in NAMES:
    encoder(g, m, d @ W[rows[m]].T)
  out["fused"] = g
  for m in NAMES:
    d = (_softmax(h[m] @ W[rows[m]] + b) - onehot) / ROWS
    g = zeros()
    g["head"]["W"][rows[m]] = h[m].T @ d
    g["head"]["b"] = d.sum(0)
    encoder(g, m, d @ W[rows[m]].T)
    out[m] = g
  return out


def integrate_oracle(g_mm, g_u, magnitude=1.5):
  """The official rule (MMPareto.py, min_norm_solvers.py) in float64."""
  a = np.concatenate([v.ravel() for v in g_mm])
  u = np.concatenate([v.ravel() for v in g_u])
  dot, sq_mm, sq_u = a @ u, a @ a, u @ u
  cos = dot / np.sqrt(sq_mm * sq_u)
  if cos > 0:
    w = 0.5
  elif dot >= sq_mm:
    w = 0.999
  elif dot >= sq_u:
    w = 0.001
  else:
    w = (sq_u - dot) / (sq_mm + sq_u - 2 * dot)
  out = []
  for gm, gu in zip(g_mm, g_u):
    n = 2 * (w * gm + (1 - w) * gu)
    out.append(magnitude * n * max(1.0, np.linalg.norm(gm + gu)
                                   / np.linalg.norm(n)))
  return out, w, cos


def combined_oracle(grads, magnitude=1.5):
  out = {"head": {n: grads["fused"]["head"][n] + sum(
      grads[m]["head"][n] for m in NAMES) for n in ("W", "b")}}
  info = {}
  for m in NAMES:
    keys = ("A", "c")
    new, w, cos = integrate_oracle([grads["fused"][m][k] for k in keys],
                                   [grads[m][m][k] for k in keys], magnitude)
    out[m] = dict(zip(keys, new))
    info[m] = (w, cos)
  return out, info


# ------------------------------------------------------------------ tests --

@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos>0", "cos<0"])
def test_integration_rule_in_both_branches(sign):
  rng = np.random.default_rng(3)
  g_mm = [rng.normal(size=(4, 3)), rng.normal(size=3)]
  # A unimodal gradient mostly along (cos > 0) or against (cos < 0) g_mm,
  # with a different norm per tensor so the rescale differs per tensor.
  g_u = [sign * 0.7 * g_mm[0] + 0.3 * rng.normal(size=(4, 3)),
         sign * 2.0 * g_mm[1] + 0.1 * rng.normal(size=3)]
  want, w, cos = integrate_oracle(g_mm, g_u)
  assert (cos > 0) == (sign > 0)
  got, w_got, cos_got = mmpareto.integrate(
      [jnp.asarray(v, jnp.float32) for v in g_mm],
      [jnp.asarray(v, jnp.float32) for v in g_u])
  assert float(cos_got) == pytest.approx(cos, rel=1e-5)
  assert float(w_got) == pytest.approx(w, rel=1e-5)
  if sign < 0:
    assert w != 0.5 and 0.001 < w < 0.999       # the min-norm interior
    # The min-norm point: orthogonal to g_mm - g_u.
    a = np.concatenate([v.ravel() for v in g_mm])
    u = np.concatenate([v.ravel() for v in g_u])
    assert (w * a + (1 - w) * u) @ (a - u) == pytest.approx(0, abs=1e-9)
  for g, v in zip(got, want):
    np.testing.assert_allclose(g, v, rtol=2e-5, atol=1e-6)


def test_min_norm_weight_clips_where_the_dot_reaches_a_norm():
  assert float(mmpareto.min_norm_weight(5.0, 4.0, 9.0)) == pytest.approx(0.999)
  assert float(mmpareto.min_norm_weight(5.0, 9.0, 4.0)) == pytest.approx(0.001)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_applies_the_oracle_gradient(seed):
  params, x, y = make(seed)
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0), labels)
  f32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  state = arl_jax.TrainState.create(params=f32, tx=tx,
                                    rng=jax.random.PRNGKey(0))
  step = jax.jit(arl_jax.make_train_step(apply, tx, arl_jax.MMPareto()))
  batch = {"inputs": {m: np.float32(v) for m, v in x.items()},
           "labels": np.int32(y)}
  new, metrics = step(state, batch)
  want, info = combined_oracle(per_loss_gradients(params, x, y))
  got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params,
                     new.params)                  # lr 1: the gradient itself
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4,
                                                       atol=1e-6), got, want)
  for m in NAMES:
    assert float(metrics["pareto_weight"][m]) == pytest.approx(info[m][0],
                                                              rel=1e-4)
    assert float(metrics["cos"][m]) == pytest.approx(info[m][1], rel=1e-3,
                                                     abs=1e-5)
  # Not the plain gradient of L_mm + sum_m L_m (the surgery changed it).
  plain = per_loss_gradients(params, x, y)
  plain_a = plain["fused"]["audio"]["A"] + plain["audio"]["audio"]["A"]
  assert not np.allclose(got["audio"]["A"], plain_a, rtol=1e-2)


def test_warmup_gives_the_plain_gradient_and_one_backward_pass():
  params, x, y = make(0)
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0), labels)
  f32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  state = arl_jax.TrainState.create(params=f32, tx=tx,
                                    rng=jax.random.PRNGKey(0))
  step = arl_jax.make_train_step(apply, tx, arl_jax.MMPareto(),
                                 warmup_steps=1)
  batch = {"inputs": {m: np.float32(v) for m, v in x.items()},
           "labels": np.int32(y)}
  new, _ = jax.jit(step)(state, batch)
  g = per_loss_gradients(params, x, y)
  plain = jax.tree.map(lambda *t: sum(t), g["fused"], g["audio"], g["visual"])
  got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params,
                     new.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-6), got, plain)
  # One forward pass: the model is applied once in the traced step.
  calls = []
  def counting(*args, **kwargs):
    calls.append(1)
    return apply(*args, **kwargs)
  jax.make_jaxpr(arl_jax.make_train_step(counting, tx, arl_jax.MMPareto()))(
      state, batch)
  assert len(calls) == 1


def test_three_modalities_each_encoder_pairs_with_its_own_loss():
  names = ("a", "b", "c")
  rng = np.random.default_rng(0)
  params = {m: {"A": jnp.asarray(rng.normal(size=(DIM, WIDTH)), jnp.float32)}
            for m in names}
  params["head"] = {"W": jnp.asarray(rng.normal(size=(3 * WIDTH, CLASSES)),
                                     jnp.float32)}
  def apply3(params, model_state, inputs, *, train, rng):
    feats = {m: jnp.tanh(inputs[m] @ params[m]["A"]) for m in names}
    head = lambda f: jnp.concatenate([f[m] for m in names], -1) @ params[
        "head"]["W"]
    return arl_jax.fused_and_unimodal_logits(head, feats), model_state
  tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                    arl_jax.label_modalities(names))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(0))
  batch = {"inputs": {m: np.float32(rng.normal(size=(8, DIM))) for m in names},
           "labels": np.int32(rng.integers(0, CLASSES, 8))}
  new, metrics = jax.jit(arl_jax.make_train_step(apply3, tx,
                                                 arl_jax.MMPareto()))(
      state, batch)
  assert set(metrics["cos"]) == set(names)
  assert all(np.isfinite(float(v)) for v in metrics["pareto_weight"].values())
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(new.params))


def test_two_backward_passes_equal_one_per_loss_on_feature_zeroing_models():
  # Summed unimodal losses restricted to encoder m are CE(p_m)'s gradient
  # when p_k zeroes the other modalities' features: 2 passes, not K + 1.
  assert len(arl_jax.MMPareto().loss_cotangents(("a", "b", "c"))) == 2
  assert len(arl_jax.MMPareto(separate_unimodal=True).loss_cotangents(
      ("a", "b", "c"))) == 4
  params, x, y = make(4)
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(1.0), labels)
  f32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  state = arl_jax.TrainState.create(params=f32, tx=tx,
                                    rng=jax.random.PRNGKey(0))
  batch = {"inputs": {m: np.float32(v) for m, v in x.items()},
           "labels": np.int32(y)}
  out = [jax.jit(arl_jax.make_train_step(apply, tx, arl_jax.MMPareto(
      separate_unimodal=s)))(state, batch)[0].params for s in (False, True)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), *out)
