import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arl_jax
from arl_jax import models
from arl_jax.data import iterate_batches
from arl_jax.data import make_linear_gaussian


def user_model_apply(params, model_state, inputs, *, train, rng):
  """A user's own model: plain functions, no Flax, a shared head."""
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]["w"]) for m in inputs}
  head = lambda f: sum(f[m] @ params["head"][m] for m in f) + params["head"]["b"]
  return arl_jax.fused_and_unimodal_logits(head, feats), model_state


def user_params(key, dims, width, classes):
  keys = jax.random.split(key, 2 * len(dims))
  params = {m: {"w": jax.random.normal(keys[i], (d, width)) / np.sqrt(d)}
            for i, (m, d) in enumerate(dims.items())}
  params["head"] = {m: 0.1 * jax.random.normal(keys[len(dims) + i],
                                               (width, classes))
                    for i, m in enumerate(dims)}
  params["head"]["b"] = jnp.zeros(classes)
  return params


def labels_of(params):
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def setup(method, warmup_steps=0, lr=0.05, names=("audio", "visual")):
  problem = make_linear_gaussian({m: 1.0 + i for i, m in enumerate(names)},
                                 num_classes=3, dim=5, sizes=(256, 64, 128))
  params = user_params(jax.random.PRNGKey(0), {m: 5 for m in names}, 8, 3)
  tx = optax.chain(arl_jax.scale_by_modality(labels_of),
                   optax.clip_by_global_norm(40.0), optax.sgd(lr, momentum=0.9))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(1))
  step = arl_jax.make_train_step(user_model_apply, tx, method,
                                 warmup_steps=warmup_steps)
  return problem, state, step, tx


def test_user_model_trains_and_reports_finite_coefficients():
  problem, state, step, _ = setup(arl_jax.ARL(temperature=4.0, gamma=1.0))
  traces = []

  def traced(s, b):
    traces.append(1)
    return step(s, b)

  jstep = jax.jit(traced)
  x, y = problem.splits["train"]
  losses = []
  for epoch in range(6):
    for batch in iterate_batches(x, y, 32, shuffle=True, epoch=epoch):
      state, metrics = jstep(state, batch)
      losses.append(float(metrics["loss"]))
      for key in ("q", "s", "a", "scale", "unimodal_loss", "unimodal_accuracy"):
        assert set(metrics[key]) == {"audio", "visual"}
        assert all(np.isfinite(float(v)) for v in metrics[key].values())
      np.testing.assert_allclose(sum(metrics["a"].values()), 1.0, rtol=1e-5)
  assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
  assert len(traces) == 1              # no recompilation across steps
  assert int(state.step) == 6 * 8


def test_step_matches_a_hand_computed_update():
  method = arl_jax.ARL(temperature=2.0, gamma=4.0)
  problem, state, step, _ = setup(method, lr=0.1)
  x, y = problem.splits["train"]
  batch = next(iterate_batches(x, y, 16))
  new_state, metrics = jax.jit(step)(state, batch)

  def loss_fn(p):
    (fused, uni), _ = user_model_apply(p, {}, batch["inputs"], train=True,
                                       rng=None)
    return arl_jax.arl_loss(fused, uni, batch["labels"], 4.0), uni

  (loss, uni), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  a = arl_jax.arl_coefficients(uni, batch["labels"], 2.0)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  for m in ("audio", "visual"):
    np.testing.assert_allclose(metrics["a"][m], a[m], rtol=1e-5)
    np.testing.assert_allclose(metrics["scale"][m], 1.0 + a[m], rtol=1e-5)
    want = state.params[m]["w"] - 0.1 * (1.0 + a[m]) * g[m]["w"]
    np.testing.assert_allclose(new_state.params[m]["w"], want, rtol=1e-4,
                               atol=1e-6)
  want = state.params["head"]["b"] - 0.1 * g["head"]["b"]
  np.testing.assert_allclose(new_state.params["head"]["b"], want, rtol=1e-5)


def test_warmup_switches_on_at_the_right_step():
  problem, state, step, _ = setup(arl_jax.ARL(temperature=8.0, gamma=4.0),
                                  warmup_steps=3)
  x, y = problem.splits["train"]
  jstep = jax.jit(step)
  batches = iterate_batches(x, y, 32)
  seen = []
  for _ in range(5):
    state, metrics = jstep(state, next(batches))
    seen.append((float(metrics["warmup"]), float(metrics["gamma"]),
                 float(metrics["scale"]["audio"]), float(metrics["a"]["audio"])))
  for t in range(3):
    assert seen[t][:3] == (1.0, 1.0, 1.0)
  for t in (3, 4):
    assert seen[t][0] == 0.0 and seen[t][1] == 4.0
    assert seen[t][2] == pytest.approx(1.0 + seen[t][3])
    assert seen[t][2] != 1.0


def test_nan_batch_is_skipped_and_does_not_poison_later_steps():
  problem, state, step, _ = setup(arl_jax.ARL(temperature=4.0))
  x, y = problem.splits["train"]
  jstep = jax.jit(step)
  good = next(iterate_batches(x, y, 16))
  bad = jax.tree.map(np.copy, good)
  bad["inputs"]["visual"][3] = np.nan
  before = state.params
  state, metrics = jstep(state, bad)
  assert float(metrics["update_skipped"]) == 1.0
  assert float(metrics["nonfinite_rows"]["visual"]) == 1.0
  assert all(np.isfinite(float(v)) for v in metrics["a"].values())
  jax.tree.map(np.testing.assert_array_equal, state.params, before)
  state, metrics = jstep(state, good)
  assert float(metrics["update_skipped"]) == 0.0
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(state.params))
  assert not np.array_equal(state.params["audio"]["w"], before["audio"]["w"])


@pytest.mark.parametrize("name,kwargs,check", [
    ("concat", {}, lambda m: m["scale"]["audio"] == 1.0 and m["gamma"] == 0.0),
    ("unimodal_regularisation", {}, lambda m: m["scale"]["audio"] == 1.0
     and m["gamma"] == 4.0),
    ("arl_no_residual", {"temperature": 4.0},
     lambda m: abs(m["scale"]["audio"] - m["a"]["audio"]) < 1e-6),
    ("arl_released", {"temperature": 8.0},
     lambda m: abs(m["scale"]["audio"] - 1 - m["a"]["audio"]) < 1e-6),
    ("arl_released_applied", {"temperature": 8.0},
     lambda m: m["scale"]["audio"] == 1.5 and m["scale"]["visual"] == 1.5),
    ("ogm_ge", {"alpha": 0.5},
     lambda m: min(m["scale"].values()) <= 1.0 and max(m["scale"].values()) == 1.0),
])
def test_every_method_runs_through_the_same_step(name, kwargs, check):
  problem, state, step, _ = setup(arl_jax.make_method(name, **kwargs))
  x, y = problem.splits["train"]
  state, metrics = jax.jit(step)(state, next(iterate_batches(x, y, 32)))
  metrics = jax.tree.map(float, metrics)
  assert check(metrics), metrics
  assert np.isfinite(metrics["loss"])


def test_three_modalities_with_bundled_flax_model():
  names = ("a", "b", "c")
  problem = make_linear_gaussian({"a": 0.5, "b": 1.0, "c": 3.0}, num_classes=4,
                                 dim=6, sizes=(256, 64, 256))
  model = models.MultimodalClassifier(
      encoders={m: models.MLPEncoder((16,)) for m in names},
      head=models.ConcatFusion(4, names))
  x, y = problem.splits["train"]
  params, model_state = models.init_model(model, jax.random.PRNGKey(0),
                                          {m: v[:2] for m, v in x.items()})
  tx = optax.chain(arl_jax.scale_by_modality(
      functools.partial(models.modality_labels, modalities=names)),
      optax.sgd(0.05, momentum=0.9))
  state = arl_jax.TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(0),
                                    model_state=model_state)
  step = jax.jit(arl_jax.make_train_step(models.make_apply_fn(model), tx,
                                         arl_jax.ARL(temperature=4.0)))
  for epoch in range(8):
    for batch in iterate_batches(x, y, 32, shuffle=True, epoch=epoch):
      state, metrics = step(state, batch)
  assert set(metrics["a"]) == set(names)
  eval_step = jax.jit(arl_jax.make_eval_step(models.make_apply_fn(model)))
  correct = count = 0
  for batch in iterate_batches(*problem.splits["test"], 100):  # padded last
    sums = eval_step(state, batch)
    correct += float(sums["correct"])
    count += float(sums["count"])
  assert count == 256
  assert correct / count > 0.6


def test_missing_scale_by_modality_and_bad_batches_are_named():
  problem, state, step, _ = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  batch = next(iterate_batches(x, y, 8))
  tx = optax.sgd(0.1)
  bare = arl_jax.TrainState.create(params=state.params, tx=tx,
                                   rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="scale_by_modality"):
    arl_jax.make_train_step(user_model_apply, tx, arl_jax.ARL())(bare, batch)
  with pytest.raises(ValueError, match="unknown batch keys"):
    step(state, {**batch, "weights": 1})
  wrong = {**batch, "inputs": {"audio": batch["inputs"]["audio"],
                               "depth": batch["inputs"]["visual"]}}
  with pytest.raises((ValueError, KeyError)):
    step(state, wrong)


def test_batch_transform_runs_inside_the_step_with_its_own_keys():
  """A transform consumes an extra batch key; pmap gives each device a key."""
  problem, state, _, tx = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  batch = next(iterate_batches(x, y, 16))
  seen = []

  def transform(b, rng):
    seen.append(rng)
    scale = b["gain"]
    inputs = {m: v * scale[:, None] for m, v in b["inputs"].items()}
    return {"inputs": inputs, "labels": b["labels"]}

  gain = np.linspace(0.5, 1.5, 16).astype(np.float32)
  step = arl_jax.make_train_step(user_model_apply, tx, arl_jax.ARL(),
                                 batch_transform=transform)
  plain = arl_jax.make_train_step(user_model_apply, tx, arl_jax.ARL())
  s1, m1 = jax.jit(step)(state, {**batch, "gain": gain})
  pre = {"inputs": {m: v * gain[:, None] for m, v in batch["inputs"].items()},
         "labels": batch["labels"]}
  s2, m2 = jax.jit(plain)(state, pre)
  jax.tree.map(np.testing.assert_allclose, s1.params, s2.params)
  np.testing.assert_allclose(m1["loss"], m2["loss"])
  # Under pmap (2 devices, the extra key sharded with the rest) the result
  # is that of the whole batch.
  devices = jax.devices()[:2]
  pstep = arl_jax.parallel.pmap_train_step(arl_jax.make_train_step(
      user_model_apply, tx, arl_jax.ARL(), axis_name="batch",
      batch_transform=transform), "batch", devices=devices)
  s3, m3 = pstep(arl_jax.parallel.replicate(state, devices),
                 arl_jax.parallel.shard_batch({**batch, "gain": gain}, 2))
  s3 = arl_jax.parallel.unreplicate(s3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               s3.params, s2.params)
  assert len(seen) == 2                # traced once per step function
