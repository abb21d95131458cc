import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

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


def test_nan_in_a_masked_row_does_not_skip_the_update():
  # The masked row is out of the loss; its NaN must not reach the gradients.
  problem, state, step, _ = setup(arl_jax.ARL(temperature=4.0))
  x, y = problem.splits["train"]
  jstep = jax.jit(step)
  good = next(iterate_batches(x, y, 16))
  mask = np.ones(16, bool)
  mask[3] = False
  bad = jax.tree.map(np.copy, good)
  bad["inputs"]["visual"][3] = np.nan
  bad["inputs"]["audio"][3] = np.inf
  new, metrics = jstep(state, {**bad, "mask": mask})
  assert float(metrics["update_skipped"]) == 0.0
  ref, ref_metrics = jstep(state, {**good, "mask": mask})
  jax.tree.map(np.testing.assert_array_equal, new.params, ref.params)
  assert float(metrics["loss"]) == float(ref_metrics["loss"])


def _oracle(name, kwargs, z, y):
  """(coefficients, scales) of each method from float64 NumPy (tests/reference)."""
  za, zv = z["audio"], z["visual"]
  if name in ("concat", "unimodal_regularisation"):
    return [0.0, 0.0], [1.0, 1.0]
  if name in ("arl", "arl_no_residual"):
    a = ref.eq18(za, zv, y, kwargs["temperature"])
    base = 1.0 if name == "arl" else 0.0
    return list(a), list(base + a)
  if name == "arl_released":
    a = ref.released(za, zv, kwargs["temperature"])
    return list(a), list(ref.gradient_residual(1.0, a))
  if name == "arl_released_applied":
    return list(ref.released(za, zv, kwargs["temperature"])), [1.5, 1.5]
  k = ref.ogm_ge([za, zv], y, kwargs["alpha"])
  return list(k), list(k)


@pytest.mark.parametrize("name,kwargs,gamma", [
    ("concat", {}, 0.0),
    ("unimodal_regularisation", {}, 4.0),
    ("arl", {"temperature": 4.0}, 4.0),
    ("arl_no_residual", {"temperature": 4.0}, 4.0),
    ("arl_released", {"temperature": 8.0}, 4.0),
    ("arl_released_applied", {"temperature": 8.0}, 4.0),
    ("ogm_ge", {"alpha": 0.5, "schedule": "warmup"}, 0.0),
])
def test_every_method_matches_its_oracle_on_the_steps_own_logits(name, kwargs,
                                                                 gamma):
  problem, state, step, _ = setup(arl_jax.make_method(name, **kwargs))
  x, y = problem.splits["train"]
  batch = next(iterate_batches(x, y, 32))
  (_, unimodal), _ = user_model_apply(state.params, {}, batch["inputs"],
                                      train=True, rng=None)
  z = {m: np.asarray(v, np.float64) for m, v in unimodal.items()}
  coefficients, scales = _oracle(name, kwargs, z, np.asarray(batch["labels"]))
  _, metrics = jax.jit(step)(state, batch)
  np.testing.assert_allclose([metrics["a"][m] for m in ("audio", "visual")],
                             coefficients, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose([metrics["scale"][m] for m in ("audio", "visual")],
                             scales, rtol=2e-5, atol=1e-6)
  assert float(metrics["gamma"]) == gamma
  if name == "ogm_ge":          # the dominant modality really is damped
    assert min(scales) < 0.99


def test_ogm_ge_noise_only_after_warmup_with_the_gradients_std():
  """GE: absent during warm-up, present after; its std is the leaf's own."""
  problem = make_linear_gaussian({"audio": 1.0, "visual": 2.0}, num_classes=3,
                                 dim=5, sizes=(256, 64, 128))
  params = user_params(jax.random.PRNGKey(0), {"audio": 5, "visual": 5}, 8, 3)
  lr = 0.1
  tx = optax.chain(arl_jax.scale_by_modality(labels_of), optax.sgd(lr))
  x, y = problem.splits["train"]
  batches = list(iterate_batches(x, y, 64))[:2]

  def run(noise):
    state = arl_jax.TrainState.create(params=params, tx=tx,
                                      rng=jax.random.PRNGKey(1))
    step = jax.jit(arl_jax.make_train_step(
        user_model_apply, tx,
        arl_jax.OGMGE(alpha=0.5, noise=noise, schedule="warmup"),
        warmup_steps=1))
    out = []
    for b in batches:
      state, metrics = step(state, b)
      out.append(state.params)
    return out, metrics

  (warm_noisy, after_noisy), m = run(True)
  (warm_plain, after_plain), m_plain = run(False)
  jax.tree.map(np.testing.assert_array_equal, warm_noisy, warm_plain)
  # After warm-up the only difference is lr * noise on the encoder leaves.
  diff = np.asarray(after_noisy["audio"]["w"] - after_plain["audio"]["w"]) / lr

  def loss(p):
    (fused, uni), _ = user_model_apply(p, {}, batches[1]["inputs"],
                                       train=True, rng=None)
    return arl_jax.arl_loss(fused, uni, batches[1]["labels"], 0.0)

  g = jax.grad(loss)(warm_plain)["audio"]["w"]
  # noise=False is plain OGM: exactly w - lr k g (so the flag is not read
  # backwards: with noise there, this would fail).
  k = float(m_plain["scale"]["audio"])
  assert k < 1.0 or float(m_plain["scale"]["visual"]) < 1.0
  np.testing.assert_allclose(after_plain["audio"]["w"],
                             warm_plain["audio"]["w"] - lr * k * g,
                             rtol=1e-5, atol=1e-7)
  assert np.std(diff) == pytest.approx(ref.ge_noise_std(g), rel=0.35)
  np.testing.assert_array_equal(after_noisy["head"]["b"],
                                after_plain["head"]["b"])   # not an encoder


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
  # Near the Bayes-optimal accuracy of the problem (not just above chance).
  assert correct / count > problem.bayes_accuracy - 0.06
  # ARL acted on the three encoders: one more step's scales are 1 + a with a
  # the coefficients of the model's own unimodal logits on that batch.
  batch = next(iterate_batches(x, y, 32, shuffle=True, epoch=99))
  (_, uni), _ = models.make_apply_fn(model)(state.params, state.model_state,
                                            batch["inputs"], train=False,
                                            rng=None)
  state, metrics = step(state, batch)
  want = arl_jax.arl_coefficients(uni, batch["labels"], 4.0)
  for m in names:
    np.testing.assert_allclose(metrics["a"][m], want[m], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["scale"][m], 1.0 + metrics["a"][m],
                               rtol=1e-6)


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
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has \['depth'\], "
                     "but the model has no encoder"):
    step(state, wrong)


def test_preprocess_runs_inside_the_step_with_its_own_keys():
  """``preprocess`` consumes an extra batch key; pmap gives each device a key."""
  problem, state, _, tx = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  batch = next(iterate_batches(x, y, 16))
  seen = []

  def preprocess(b, rng):
    seen.append(rng)
    scale = b["gain"]
    inputs = {m: v * scale[:, None] for m, v in b["inputs"].items()}
    return {"inputs": inputs, "labels": b["labels"]}

  gain = np.linspace(0.5, 1.5, 16).astype(np.float32)
  step = arl_jax.make_train_step(user_model_apply, tx, arl_jax.ARL(),
                                 preprocess=preprocess)
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
      preprocess=preprocess), "batch", devices=devices)
  s3, m3 = pstep(arl_jax.parallel.replicate(state, devices),
                 arl_jax.parallel.shard_batch({**batch, "gain": gain}, 2))
  s3 = arl_jax.parallel.unreplicate(s3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               s3.params, s2.params)
  assert len(seen) == 2                # traced once per step function
  # The old name still works, with a DeprecationWarning; not both names.
  with pytest.warns(DeprecationWarning, match="preprocess"):
    old = arl_jax.make_train_step(user_model_apply, tx, arl_jax.ARL(),
                                  batch_transform=preprocess)
  s4, _ = jax.jit(old)(state, {**batch, "gain": gain})
  jax.tree.map(np.testing.assert_array_equal, s4.params, s1.params)
  with pytest.warns(DeprecationWarning, match="preprocess"):
    arl_jax.make_eval_step(user_model_apply, batch_transform=lambda b: b)
  with pytest.raises(TypeError, match="preprocess only"):
    arl_jax.make_eval_step(user_model_apply, preprocess=lambda b: b,
                           batch_transform=lambda b: b)


@pytest.mark.parametrize("names", [("audio", "visual"), ("x", "y", "z")])
def test_normalized_loss_weights_divide_loss_and_update_by_their_sum(names):
  # Plain SGD without momentum or clipping: the update is -lr * gradient, so
  # the normalised step's update is the plain one over 1 + gamma_t K, with
  # gamma_t the warm-up weight (1) first and gamma (4) after.
  problem, state, _, _ = setup(arl_jax.UnimodalRegularisation(), names=names)
  tx = optax.chain(arl_jax.scale_by_modality(labels_of), optax.sgd(0.1))
  state = arl_jax.TrainState.create(params=state.params, tx=tx,
                                    rng=jax.random.PRNGKey(1))
  x, y = problem.splits["train"]
  batch = {"inputs": {m: v[:32] for m, v in x.items()}, "labels": y[:32]}
  method = arl_jax.UnimodalRegularisation(gamma=4.0, warmup_gamma=1.0)
  k = len(names)
  for warmup_steps, gamma in ((1, 1.0), (0, 4.0)):
    steps = [jax.jit(arl_jax.make_train_step(
        user_model_apply, tx, method, warmup_steps=warmup_steps,
        check_tx=False, normalize_loss_weights=n)) for n in (False, True)]
    (plain, mp), (norm, mn) = (s(state, batch) for s in steps)
    np.testing.assert_allclose(mn["loss"], mp["loss"] / (1 + gamma * k),
                               rtol=1e-6)
    for a, b, p0 in zip(jax.tree.leaves(plain.params),
                        jax.tree.leaves(norm.params),
                        jax.tree.leaves(state.params)):
      np.testing.assert_allclose(np.asarray(b) - p0,
                                 (np.asarray(a) - p0) / (1 + gamma * k),
                                 rtol=1e-4, atol=1e-7)


def test_normalized_loss_weights_refused_for_alternating_methods():
  _, state, _, tx = setup(arl_jax.ARL())
  with pytest.raises(ValueError, match="normalize_loss_weights"):
    arl_jax.make_train_step(user_model_apply, tx, arl_jax.MLA(),
                            normalize_loss_weights=True)


def test_a_mask_of_shape_batch_by_one_is_named_as_such():
  problem, state, step, _ = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  batch = {"inputs": {m: v[:8] for m, v in x.items()}, "labels": y[:8],
           "mask": np.ones((8, 1), bool)}
  with pytest.raises(ValueError, match=r"mask'\] must have shape \[batch\] = "
                     r"\(8,\).*got shape \(8, 1\)"):
    jax.jit(step)(state, batch)
  with pytest.raises(ValueError, match=r"labels'\] must have shape \[batch\]"):
    jax.jit(step)(state, {**batch, "mask": None, "labels": y[:8, None]})


def test_a_stateful_custom_method_without_its_state_is_named():
  import dataclasses
  from typing import ClassVar

  @dataclasses.dataclass(frozen=True)
  class Counting(arl_jax.Method):
    name: ClassVar[str] = "counting_for_test"

    def init_state(self, modalities):
      return {"count": jnp.zeros(())}

    def modulate(self, stats, heldout, state):
      return self.modulation(stats), {"count": state["count"] + 1}

  problem, state, _, tx = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  batch = {"inputs": {m: v[:8] for m, v in x.items()}, "labels": y[:8]}
  step = arl_jax.make_train_step(user_model_apply, tx, Counting())
  with pytest.raises(ValueError, match="keeps state, but the TrainState has "
                     "none.*method=method"):
    jax.jit(step)(state, batch)
  good = arl_jax.TrainState.create(params=state.params, tx=tx,
                                   rng=jax.random.PRNGKey(1),
                                   method=Counting(),
                                   modalities=tuple(x))
  new, _ = jax.jit(step)(good, batch)
  assert float(new.method_state["count"]) == 1.0


def test_a_batch_input_without_an_encoder_is_named():
  problem, state, step, _ = setup(arl_jax.ARL())
  x, y = problem.splits["train"]
  b = next(iterate_batches(x, y, 16))
  b["inputs"]["text"] = np.zeros((16, 3), np.float32)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has \['text'\], "
                     "but the model has no encoder for it"):
    jax.jit(step)(state, b)


def test_pmap_of_a_step_built_without_its_axis_is_refused():
  _, _, step, _ = setup(arl_jax.ARL())           # built without axis_name
  with pytest.raises(ValueError, match="built with axis_name=None, but is "
                     "mapped over the axis 'batch'"):
    arl_jax.parallel.pmap_train_step(step, "batch")
