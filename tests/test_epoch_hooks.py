"""Epoch hooks outside the runner: arl_jax.epoch_hooks.EpochHook in a plain
loop (PMR, G-Blending, D&R), G-Blending's weights vmapped over seeds, and
every seed's hook of a stacked state (SeedEpochHooks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax import models
from arl_jax.epoch_hooks import EpochHook
from arl_jax.methods import g_blending

NAMES = ("audio", "visual")


def _problem(n=48, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n).astype(np.int32)
  x = {"audio": (rng.normal(size=(n, 5)) + y[:, None]).astype(np.float32),
       "visual": rng.normal(size=(n, 4)).astype(np.float32)}
  return x, y


def _batches(x, y, size=16):
  def epoch(seed=0):
    order = np.random.default_rng(seed).permutation(len(y))
    for i in range(0, len(y), size):
      rows = order[i:i + size]
      yield {"inputs": {m: v[rows] for m, v in x.items()}, "labels": y[rows]}
  return epoch


def _setup(method):
  x, y = _problem()
  vx, vy = _problem(24, seed=1)
  model = models.multiview_classifier({"audio": 5, "visual": 4}, 3,
                                      encoder_widths=(8,))
  params, model_state = models.init_model(model, jax.random.PRNGKey(0),
                                          {m: v[:2] for m, v in x.items()})
  apply_fn = models.make_apply_fn(model, with_features=method.needs_features)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                    arl_jax.label_modalities(NAMES))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(1), method=method,
                                    modalities=NAMES)
  train = _batches(x, y)
  hook = EpochHook(method, apply_fn=apply_fn, tx=tx, num_classes=3,
                   train_batches=train,
                   validation_batches=lambda: _batches(vx, vy)(0),
                   num_epochs=4, seed=0)
  return apply_fn, tx, state, train, hook, (x, y)


def test_pmr_in_a_plain_loop_gets_its_prototypes_from_the_hook():
  method = arl_jax.PMR(fraction=1.0, schedule="warmup")
  apply_fn, tx, state, train, hook, (x, y) = _setup(method)
  step = jax.jit(arl_jax.make_train_step(apply_fn, tx, method))
  with pytest.raises(ValueError, match="needs its prototypes"):
    step(state, next(train(0)))
  state, record = hook(0, state)
  assert record == {"prototypes_from_rows": len(y)}
  # The prototypes are the class means of the encoders' features (float64).
  feats = apply_fn.encode(state.params, state.model_state, x)
  for m in NAMES:
    f = np.asarray(feats[m], np.float64)
    want = np.stack([f[y == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(state.method_state["prototypes"][m], want,
                               rtol=1e-5, atol=1e-6)
  for epoch in (1, 2):
    for batch in train(epoch):
      state, metrics = step(state, batch)
    state, _ = hook(epoch, state)
  assert np.isfinite(float(metrics["loss"]))


def test_g_blending_in_a_plain_loop_trains_copies_and_sets_weights():
  method = arl_jax.GBlending(super_epoch=2)
  apply_fn, tx, state, train, hook, _ = _setup(method)
  state, record = hook(0, state)
  weights = record["weights"]
  assert set(weights) == {"fused", *NAMES}
  assert sum(weights.values()) == pytest.approx(1.0)
  for k, w in weights.items():
    assert float(state.method_state["weights"][k]) == pytest.approx(w)
  for t0, t1, v0, v1 in record["curves"].values():
    assert np.isfinite([t0, t1, v0, v1]).all() and t1 < t0   # copies learn
  # Between estimations the hook leaves the state alone.
  same, record = hook(1, state)
  assert record == {} and same is not None
  # A copy trains a fresh optimiser: the state's own is untouched.
  fit = hook.fit_copy(state, ("audio",), 1)
  assert len(fit[0]) == len(fit[1]) == 1


def test_dr_in_a_plain_loop_reinitialises_on_its_schedule():
  method = arl_jax.DiagnoseRelearn()     # official 20/40/60 of 90 -> 1/2/3 of 4
  apply_fn, tx, state, train, hook, _ = _setup(method)
  epochs = method.reinit_epochs(4)
  state, _ = hook(0, state)
  before = jax.device_get(state.params)
  # The official loop's 0-based epoch e is this loop's epoch e + 1.
  state, record = hook(int(epochs[0]) + 1, state)
  assert record, "D&R's hook ran nothing at its first re-initialisation"
  after = jax.device_get(state.params)
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert any(moved)


def test_a_method_without_hook_passes_through_and_bad_splits_are_named():
  apply_fn, tx, state, train, hook, _ = _setup(arl_jax.ARL())
  same, record = hook(3, state)
  assert same is state and record == {}
  _, _, state, _, hook, _ = _setup(arl_jax.PMR(schedule="warmup"))
  with pytest.raises(ValueError, match="never 'test'"):
    hook.context(jax.device_get(state)).features("test")


def test_a_hooked_method_needs_the_encoders():
  def apply_fn(params, model_state, inputs, *, train, rng):
    raise AssertionError("not called")
  with pytest.raises(ValueError, match="make_apply_fn"):
    EpochHook(arl_jax.PMR(), apply_fn=apply_fn, tx=optax.sgd(0.1),
              num_classes=3, train_batches=lambda s: [],
              validation_batches=lambda: [])


def test_blending_weights_vmap_over_seeds_equals_each_seed():
  rng = np.random.default_rng(0)
  seeds, heads = 5, ("fused", "audio", "visual")
  curves = {k: rng.uniform(0.5, 3.0, size=(4, seeds)) for k in heads}
  curves["visual"][:, 2] = [1.0, 1.0, 1.0, 1.0]     # O = 0 in seed 2
  for ratio in ("delta", "multibench"):
    stacked = {k: tuple(jnp.asarray(c[i], jnp.float32) for i in range(4))
               for k, c in curves.items()}
    got = jax.jit(jax.vmap(lambda c, r=ratio: g_blending.blending_weights(
        c, r)))(stacked)
    for s in range(seeds):
      want = g_blending.blending_weights(
          {k: tuple(float(c[i, s]) for i in range(4))
           for k, c in curves.items()}, ratio)
      for k in heads:
        assert float(got[k][s]) == pytest.approx(want[k], rel=1e-5)


def _seed_hooks(method, seeds=(0, 1, 2)):
  """Per-seed hooks (own initialisation, batch orders, optimiser noise key)
  and their stacked state."""
  x, y = _problem()
  vx, vy = _problem(24, seed=1)
  model = models.multiview_classifier({"audio": 5, "visual": 4}, 3,
                                      encoder_widths=(8,))
  apply_fn = models.make_apply_fn(model, with_features=method.needs_features)
  hooks, states = [], []
  for s in seeds:
    params, model_state = models.init_model(model, jax.random.PRNGKey(s),
                                            {m: v[:2] for m, v in x.items()})
    tx = arl_jax.with_modality_scales(optax.sgd(0.1, momentum=0.9),
                                      arl_jax.label_modalities(NAMES),
                                      noise_seed=s)
    states.append(jax.device_get(arl_jax.TrainState.create(
        params=params, tx=tx, model_state=model_state,
        rng=jax.random.PRNGKey(s + 1), method=method, modalities=NAMES)))
    order = _batches(x, y)
    hooks.append(EpochHook(
        method, apply_fn=apply_fn, tx=tx, num_classes=3,
        train_batches=lambda seed, o=order, s=s: o(seed * 7 + s),
        validation_batches=lambda: _batches(vx, vy)(0), num_epochs=4,
        seed=s))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
  return hooks, states, stacked


def test_g_blending_over_seeds_trains_every_copy_in_one_program():
  method = arl_jax.GBlending(super_epoch=2)
  hooks, states, stacked = _seed_hooks(method)
  together = arl_jax.epoch_hooks.SeedEpochHooks(hooks)
  assert together.fit_copy is not None       # one vmapped copy per head
  new, records = together(0, stacked)
  assert len(records) == len(hooks)
  for k, (hook, state) in enumerate(zip(hooks, states)):
    alone, want = hook(0, state)
    got = records[k]
    assert set(got["weights"]) == set(want["weights"])
    for head in want["weights"]:
      assert got["weights"][head] == pytest.approx(want["weights"][head],
                                                   rel=1e-5)
      np.testing.assert_allclose(got["curves"][head], want["curves"][head],
                                 rtol=1e-5)
      assert float(new.method_state["weights"][head][k]) == pytest.approx(
          float(alone.method_state["weights"][head]), rel=1e-5)
  # The seeds' copies differ (own initialisation and batch orders).
  assert records[0]["curves"] != records[1]["curves"]
  # Between estimations, and after the last epoch, nothing is estimated.
  for epoch in (1, 4):
    same, records = together(epoch, new)
    assert records == [{}, {}, {}]
  assert hooks[0](4, states[0])[1] == {}


def test_a_per_seed_hook_runs_on_each_seeds_slice():
  method = arl_jax.PMR(fraction=1.0, schedule="warmup")
  hooks, states, stacked = _seed_hooks(method, seeds=(0, 1))
  together = arl_jax.epoch_hooks.SeedEpochHooks(hooks)
  assert together.fit_copy is None
  new, records = together(0, stacked)
  for k, (hook, state) in enumerate(zip(hooks, states)):
    alone, record = hook(0, state)
    assert records[k] == record
    jax.tree.map(lambda a, b, k=k: np.testing.assert_array_equal(
        np.asarray(a)[k], b), new.method_state, jax.device_get(
            alone.method_state))
  with pytest.raises(ValueError, match="one EpochHook per seed"):
    arl_jax.epoch_hooks.SeedEpochHooks([])
  with pytest.raises(ValueError, match="one optimiser per seed"):
    arl_jax.epoch_hooks.make_fit_copy_over_seeds(
        None, [optax.sgd(0.1)], [lambda s: [], lambda s: []], lambda: [])
