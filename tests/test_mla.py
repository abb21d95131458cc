"""MLA: alternating masked sub-steps, the projection and the gated fusion,
against an independent float64 NumPy computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import parallel_runs
import pytest

import arl_jax
from arl_jax import parallel
from arl_jax.methods import mla as mla_lib

NAMES = ("audio", "visual", "video")
DIMS = {"audio": 5, "visual": 4, "video": 3}
D, C, B = 6, 3, 16
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def apply_fn(params, model_state, inputs, *, train, rng):
  """tanh encoders, one shared linear head: ``z_m = h_m W + b``."""
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]["e"]) for m in inputs}
  head = params["head"]["classifier"]
  unimodal = {m: h @ head["kernel"] + head["bias"] for m, h in feats.items()}
  fused = sum(h @ head["kernel"] for h in feats.values()) + head["bias"]
  return (fused, unimodal, feats), model_state


def init(names, seed=0):
  rng = np.random.default_rng(seed)
  params = {m: {"e": rng.normal(0, 0.6, (DIMS[m], D)).astype(np.float32)}
            for m in names}
  params["head"] = {"classifier": {
      "kernel": rng.normal(0, 0.5, (D, C)).astype(np.float32),
      "bias": rng.normal(0, 0.1, (C,)).astype(np.float32)}}
  return params


def batch(names, seed, rows=B):
  rng = np.random.default_rng(100 + seed)
  return {"inputs": {m: rng.normal(size=(rows, DIMS[m])).astype(np.float32)
                     for m in names},
          "labels": rng.integers(0, C, rows).astype(np.int32)}


def make(method, names, optimizer=None, axis_name=None, seed=0):
  params = init(names, seed)
  labels = arl_jax.label_modalities(names)
  optimizer = optimizer or optax.chain(optax.add_decayed_weights(WD),
                                       optax.sgd(LR, momentum=MOMENTUM))
  tx = arl_jax.with_modality_scales(optimizer, labels, placement="gradient")
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(0), method=method,
                                    modalities=names)
  step = arl_jax.make_train_step(apply_fn, tx, method, axis_name=axis_name,
                                 check_tx=False)
  return state, step


# ---------------------------------------------------------------- oracle --

def _softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def oracle(params, batches, projection, batches_per_epoch, names):
  """MLA by hand in float64: per step, per modality in sorted order."""
  p = {k: {kk: {kkk: np.float64(v) for kkk, v in vv.items()} if
           isinstance(vv, dict) else np.float64(vv) for kk, vv in d.items()}
       for k, d in params.items()}
  mu = jax.tree.map(np.zeros_like, p)
  proj = np.eye(D)
  n, t = 0, 0
  for b in batches:
    y = np.eye(C)[b["labels"]]
    for m in sorted(names):
      x = np.float64(b["inputs"][m])
      w, bias = p["head"]["classifier"]["kernel"], p["head"]["classifier"]["bias"]
      h = np.tanh(x @ p[m]["e"])
      dz = (_softmax(h @ w + bias) - y) / len(y)
      g = {"kernel": h.T @ dz, "bias": dz.sum(0)}
      g_e = x.T @ ((dz @ w.T) * (1 - h ** 2))
      if projection != "none" and n != 0:
        r = h.mean(0)
        alpha = 0.1 ** (1 + (t % batches_per_epoch) / batches_per_epoch)
        k = proj @ r
        proj = proj - np.outer(k, k) / (alpha + r @ k)
        proj = proj / np.linalg.norm(proj)
        pg = proj @ g["kernel"]
        g["kernel"] = pg if projection == "replace" else g["kernel"] + pg
      for leaf, grad in ((("head", "classifier", "kernel"), g["kernel"]),
                         (("head", "classifier", "bias"), g["bias"]),
                         ((m, "e"), g_e)):
        node_p, node_mu = p, mu
        for key in leaf[:-1]:
          node_p, node_mu = node_p[key], node_mu[key]
        grad = grad + WD * node_p[leaf[-1]]
        node_mu[leaf[-1]] = MOMENTUM * node_mu[leaf[-1]] + grad
        node_p[leaf[-1]] = node_p[leaf[-1]] - LR * node_mu[leaf[-1]]
      n += 1
    t += 1
  return p, mu, proj


def _momentum(opt_state):
  """The SGD trace (params-shaped) inside the chained optimiser state."""
  found = [s.trace for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
           if isinstance(s, optax.TraceState)]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("projection", ["none", "replace", "add"])
@pytest.mark.parametrize("names", [NAMES[:2], NAMES], ids=["K2", "K3"])
def test_alternating_masked_steps_match_numpy(projection, names):
  names = tuple(sorted(names))
  method = arl_jax.MLA(projection=projection, batches_per_epoch=2)
  state, step = make(method, names)
  batches = [batch(names, s) for s in range(3)]
  init_params = jax.device_get(state.params)
  step = jax.jit(step)
  for b in batches:
    state, metrics = step(state, b)
  want, want_mu, want_proj = oracle(init_params, batches, projection, 2, names)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  jax.tree.map(close, jax.device_get(state.params), want)
  jax.tree.map(close, jax.device_get(_momentum(state.opt_state)), want_mu)
  assert int(state.method_state["n"]) == 3 * len(names)
  if projection != "none":
    close(np.asarray(state.method_state["P"]), want_proj)
  else:
    assert "P" not in state.method_state
  assert np.isfinite(float(metrics["loss"]))


def test_inactive_encoders_and_their_adam_moments_do_not_move():
  """With Adam (moments and a step count), sub-step m touches encoder m and
  the head only; the counter advances once per training step."""
  names = NAMES[:2]
  state, step = make(arl_jax.MLA(), names, optimizer=optax.adam(1e-2))
  b = batch(names, 0)
  # The first sub-step (audio) alone: run a method whose order is audio only.
  class AudioOnly(arl_jax.MLA):
    def substep_order(self, names):
      return ("audio",)
  only = AudioOnly()
  _, one_step = make(only, names, optimizer=optax.adam(1e-2))
  new, _ = jax.jit(one_step)(state, b)
  np.testing.assert_array_equal(new.params["visual"]["e"],
                                state.params["visual"]["e"])
  assert not np.allclose(new.params["audio"]["e"], state.params["audio"]["e"])
  adam = [s for s in jax.tree.leaves(
      new.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  np.testing.assert_array_equal(adam.mu["visual"]["e"], 0.0)
  np.testing.assert_array_equal(adam.nu["visual"]["e"], 0.0)
  assert int(adam.count) == 1
  full, _ = jax.jit(step)(state, b)
  adam = [s for s in jax.tree.leaves(
      full.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert int(adam.count) == 1       # two sub-steps, one count
  # Visual's first Adam update is its sub-step's only: lr * sign-like step.
  assert not np.allclose(full.params["visual"]["e"],
                         state.params["visual"]["e"])


def test_projection_update_matches_numpy():
  rng = np.random.default_rng(3)
  p = rng.normal(size=(5, 5))
  r = rng.normal(size=5)
  k = p @ r
  want = p - np.outer(k, k) / (0.05 + r @ k)
  want /= np.linalg.norm(want)
  got = mla_lib.projection_update(jnp.asarray(p, jnp.float32),
                                  jnp.asarray(r, jnp.float32), 0.05)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mla_lib.projection_alpha(jnp.int32(7), 4),
                             0.1 ** (1 + 3 / 4), rtol=1e-6)


def _gates_numpy(z, valid):
  ent = {}
  for m, v in z.items():
    p = _softmax(np.float64(v[valid]), axis=0)
    ent[m] = -np.sum(p * np.log(p))
  e = np.array([ent[m] for m in sorted(z)])
  g = np.exp(e.max() - e) / np.exp(e.max() - e).sum()
  return dict(zip(sorted(z), g))


def test_gated_fusion_matches_numpy_and_ignores_padded_rows():
  rng = np.random.default_rng(4)
  z = {m: rng.normal(0, 2, (10, C)).astype(np.float32) for m in NAMES}
  valid = np.array([True] * 7 + [False] * 3)
  z_padded = {m: np.where(valid[:, None], v, 1e4).astype(np.float32)
              for m, v in z.items()}
  got = arl_jax.MLA(gate_batch=0).eval_logits(None, z_padded, valid)
  g = _gates_numpy(z, valid)
  want = sum(g[m] * np.float64(z_padded[m]) for m in NAMES)
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5)
  # Per-row entropy gates (BalanceBenchmark) and fixed weights.
  got = arl_jax.MLA(gating="sample_entropy").eval_logits(None, z, valid)
  ent = {m: -np.sum(_softmax(np.float64(v)) * np.log(_softmax(np.float64(v))),
                    -1) for m, v in z.items()}
  e = np.stack([ent[m] for m in sorted(z)])
  g = _softmax(-e, axis=0)
  want = sum(g[i][:, None] * z[m] for i, m in enumerate(sorted(z)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  two = {m: z[m] for m in NAMES[:2]}
  got = arl_jax.MLA(gating="fixed", fixed_weights=(0.55, 0.45)).eval_logits(
      None, two, valid)
  np.testing.assert_allclose(got, 0.55 * two["audio"] + 0.45 * two["visual"],
                             rtol=1e-6)


def test_eval_step_scores_the_gated_fusion():
  names = NAMES[:2]
  method = arl_jax.MLA(gate_batch=0)
  state, _ = make(method, names)
  b = batch(names, 1)
  out = jax.jit(arl_jax.make_eval_step(apply_fn, method=method))(state, b)
  (fused, unimodal, _), _ = apply_fn(state.params, {}, b["inputs"],
                                     train=False, rng=None)
  want = method.eval_logits(fused, unimodal, np.ones(B, bool))
  np.testing.assert_allclose(out["fused_logits"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["predictions"], np.argmax(want, -1))


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_data_parallel_equals_one_device(mode):
  names = NAMES[:2]
  method = arl_jax.MLA(projection="replace", batches_per_epoch=2)
  batches = [batch(names, s, rows=32) for s in range(2)]
  for b in batches:
    b["mask"] = np.ones(32, bool)
    b["mask"][8:13] = False
  state, step = make(method, names)
  one = jax.jit(step)
  for b in batches:
    state, ref = one(state, b)
  devices = jax.devices()[:4]
  st, pstep = make(method, names, axis_name="batch" if mode == "pmap" else None)
  st, metrics = parallel_runs.run_steps(st, pstep, batches, mode, devices)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, jax.device_get(st.params), jax.device_get(state.params))
  jax.tree.map(close, jax.device_get(st.method_state),
               jax.device_get(state.method_state))
  close(metrics["loss"], ref["loss"])
  # The batch-entropy gates over the global batch under pmap too
  # (gate_batch=0), and per group of rows (a device holds whole groups).
  valid = batches[0]["mask"]
  for gated in (dataclasses.replace(method, gate_batch=0),
                dataclasses.replace(method, gate_batch=4)):
    ev = arl_jax.make_eval_step(apply_fn, method=gated)
    want = jax.jit(ev)(state, batches[0])
    pev = jax.pmap(lambda s, b, gated=gated: arl_jax.make_eval_step(
        apply_fn, method=gated, axis_name="batch")(s, b), axis_name="batch",
                   devices=devices)
    got = pev(parallel.replicate(state, devices, "batch"),
              parallel.shard_batch(batches[0], 4))
    close(np.asarray(got["fused_logits"]).reshape(32, C)[valid],
          np.asarray(want["fused_logits"])[valid])


def test_bad_fields_and_missing_head_are_named():
  with pytest.raises(ValueError, match="projection must be one of"):
    arl_jax.MLA(projection="sometimes")
  with pytest.raises(ValueError, match="gating must be one of"):
    arl_jax.MLA(gating="max")
  with pytest.raises(ValueError, match="head_kernel 'head/fc/kernel'"):
    arl_jax.MLA(projection="replace", head_kernel="head/fc/kernel"
                ).initial_state(NAMES[:2], init(NAMES[:2]))
  with pytest.raises(ValueError, match="fixed_weights has 3 entries"):
    arl_jax.MLA(gating="fixed", fixed_weights=(1, 1, 1)).init_state(NAMES[:2])
  with pytest.raises(ValueError, match="accumulation_steps=1"):
    arl_jax.make_train_step(apply_fn, optax.sgd(0.1), arl_jax.MLA(),
                            accumulation_steps=2)
