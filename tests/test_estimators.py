"""Variance estimators, held-out rows and fusion weighting (issue: imbalance)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import arl_jax
from arl_jax import estimators
from arl_jax import fusion_weighting
from arl_jax import parallel
from arl_jax.data import make_imbalanced


def _logits(seed, names, batch=48, classes=4):
  rng = np.random.default_rng(seed)
  z = {m: (rng.normal(size=(batch, classes)) * (0.5 + i)).astype(np.float32)
       for i, m in enumerate(names)}
  y = rng.integers(0, classes, batch).astype(np.int32)
  return z, y


def _true_prob(z, y):
  return ref.softmax(z)[np.arange(len(y)), y]


# ------------------------------------------------------------ estimators --

@pytest.mark.parametrize("names", [("b", "a"), ("c", "a", "b")])
def test_estimators_against_float64_numpy(names):
  z, y = _logits(0, names)
  zh, yh = _logits(1, names, batch=40)
  train = arl_jax.modality_statistics(z, y)
  held = arl_jax.modality_statistics(zh, yh)
  want = {
      "train_entropy": {m: 1 / ref.entropy(z[m]).mean() for m in names},
      "heldout_entropy": {m: 1 / ref.entropy(zh[m]).mean() for m in names},
      "heldout_variance": {m: 1 / np.var(_true_prob(zh[m], yh))
                           for m in names},
      "heldout_error": {m: 1 / np.mean((1 - _true_prob(zh[m], yh)) ** 2)
                        for m in names},
  }
  for name, expected in want.items():
    got = estimators.inverse_variance(name, train, held)
    for m in names:
      np.testing.assert_allclose(got[m], expected[m], rtol=2e-5)
  with pytest.raises(ValueError, match="needs held-out rows"):
    estimators.inverse_variance("heldout_variance", train, None)
  with pytest.raises(ValueError, match="unknown estimator 'entropy'"):
    estimators.inverse_variance("entropy", train, held)


@pytest.mark.parametrize("seed", range(20))
def test_a_modality_at_the_class_prior_never_gets_the_largest_error_q(seed):
  # Informative modalities: a is calibrated by construction (each row's
  # label drawn from its predicted distribution), b puts at least half its
  # mass on the true class; the useless one predicts the class prior
  # (uniform) on every row: p_y = 1/C, variance 0.
  rng = np.random.default_rng(seed)
  classes, rows = int(rng.integers(2, 8)), 4000
  names = ("informative_a", "informative_b", "prior")
  p = {m: rng.dirichlet(np.full(classes, c), rows)
       for m, c in (("informative_a", 0.3), ("informative_b", 2.0))}
  y = np.array([rng.choice(classes, p=row) for row in p["informative_a"]])
  p["informative_b"] = np.where(
      np.eye(classes, dtype=bool)[y], 0.0, p["informative_b"]) * 0.5
  p["informative_b"][np.arange(rows), y] = 1 - p["informative_b"].sum(-1)
  logits = {m: np.log(np.clip(v, 1e-9, 1)).astype(np.float32)
            for m, v in p.items()}
  logits["prior"] = np.zeros((rows, classes), np.float32)
  held = arl_jax.modality_statistics(logits, y.astype(np.int32))
  err = estimators.inverse_variance("heldout_error", held, held)
  assert max(err, key=lambda m: float(err[m])) != "prior"
  for m in names[:2]:
    assert float(err[m]) > float(err["prior"])
  # The variance alone is blind to bias: zero for the prior modality, whose
  # q then hits the floor's 1e6 and is the largest.
  var = estimators.inverse_variance("heldout_variance", held, held)
  assert max(var, key=lambda m: float(var[m])) == "prior"
  # In ARL's coefficients (reference: the prior modality) the error estimate
  # never pushes the prior modality hardest for being "reliable".
  method = arl_jax.ARL(temperature=4.0, estimator="heldout_error",
                       reference="prior")
  a = method.modulate(held, held, ())[0].coefficients
  assert all(np.isfinite(float(v)) for v in a.values())


def test_coefficients_with_an_estimator_are_eq18_with_that_q():
  names = ("audio", "visual")
  z, y = _logits(2, names)
  zh, yh = _logits(3, names)
  method = arl_jax.ARL(temperature=4.0, estimator="heldout_variance",
                       dependency="heldout")
  modulation, _ = method.modulate(arl_jax.modality_statistics(z, y),
                                  arl_jax.modality_statistics(zh, yh), ())
  q = [1 / np.var(_true_prob(zh[m], yh)) for m in names]
  s = [_true_prob(zh[m], yh).sum() for m in names]
  want = ref.softmax(np.array([4.0 * q[0] / q[1], 4.0 * s[0] / s[1]]))
  np.testing.assert_allclose([modulation.coefficients[m] for m in names],
                             want, rtol=2e-5)


def test_ema_is_a_weighted_mean_of_the_batch_sums():
  names = ("a", "b")
  method = arl_jax.ARL(estimator="heldout_variance", ema=0.8)
  state = method.init_state(names)
  batches = [_logits(10 + t, names, batch=16) for t in range(4)]
  for zh, yh in batches:
    stats = arl_jax.modality_statistics(zh, yh)
    modulation, state = method.modulate(stats, stats, state)
  # Weights of the batches in the average: (1 - d) d^k, the first one d^3.
  w = np.array([0.8 ** 3, 0.2 * 0.8 ** 2, 0.2 * 0.8, 0.2])
  for m in names:
    p = [_true_prob(zh[m], yh) for zh, yh in batches]
    mean = sum(wi * pi.sum() for wi, pi in zip(w, p)) / (16 * w.sum())
    sq = sum(wi * (pi ** 2).sum() for wi, pi in zip(w, p)) / (16 * w.sum())
    np.testing.assert_allclose(modulation.diagnostics["q_estimate"][m],
                               1 / (sq - mean ** 2), rtol=1e-4)
  with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
    arl_jax.ARL(ema=1.0)


# ----------------------------------------------- held-out rows in a step --

NAMES = ("a", "b", "c")


def _apply(params, model_state, inputs, *, train, rng):
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]) for m in inputs}
  head = lambda f: sum(f[m] @ params["head"][m] for m in f) + params["head"]["bias"]
  return arl_jax.fused_and_unimodal_logits(head, feats), model_state


def _setup(method, names=NAMES, axis_name=None):
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(names))
  params = {m: jax.random.normal(keys[i], (6, 8)) * 0.4
            for i, m in enumerate(names)}
  params["head"] = {m: jax.random.normal(keys[len(names) + i], (8, 4)) * 0.3
                    for i, m in enumerate(names)}
  params["head"]["bias"] = jnp.zeros(4)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1, momentum=0.9),
                                    arl_jax.label_modalities(names))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(1), method=method,
                                    modalities=names)
  return state, arl_jax.make_train_step(_apply, tx, method,
                                        axis_name=axis_name)


def _batch(step, rows=32, names=NAMES, heldout=True):
  rng = np.random.default_rng(step)
  y = rng.integers(0, 4, rows).astype(np.int32)
  x = {m: (rng.normal(size=(rows, 6)) + y[:, None] * (0.3 + 0.2 * i))
       .astype(np.float32) for i, m in enumerate(names)}
  batch = {"inputs": x, "labels": y}
  if heldout:
    hy = rng.integers(0, 4, rows).astype(np.int32)
    batch["heldout"] = {
        "inputs": {m: (rng.normal(size=(rows, 6)) + hy[:, None] * 0.4)
                   .astype(np.float32) for m in names},
        "labels": hy, "mask": np.arange(rows) < rows - 3}
  return batch


def test_heldout_rows_leave_gradients_bitwise_unchanged():
  ur_state, ur_step = _setup(arl_jax.UnimodalRegularisation())
  plain = jax.jit(ur_step)(ur_state, _batch(0, heldout=False))
  with_heldout = jax.jit(ur_step)(ur_state, _batch(0))
  jax.tree.map(np.testing.assert_array_equal, plain[0].params,
               with_heldout[0].params)
  # ARL reading held-out rows: same loss and gradients as the paper's ARL;
  # only the coefficients (and so the update) differ.
  state, step = _setup(arl_jax.ARL(estimator="heldout_variance"))
  paper_state, paper_step = _setup(arl_jax.ARL())
  _, m1 = jax.jit(step)(state, _batch(0))
  _, m2 = jax.jit(paper_step)(paper_state, _batch(0, heldout=False))
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_array_equal(m1[key], m2[key])
  assert not np.allclose(m1["a"]["a"], m2["a"]["a"])


def test_step_needs_heldout_rows_when_the_estimator_does():
  state, step = _setup(arl_jax.ARL(estimator="heldout_entropy"))
  with pytest.raises(ValueError, match="needs held-out rows"):
    step(state, _batch(0, heldout=False))


def test_heldout_ema_state_is_checkpointable_and_one_compile():
  state, step = _setup(arl_jax.ARL(estimator="heldout_variance", ema=0.9))
  traces = []

  def counted(s, b):
    traces.append(1)
    return step(s, b)

  jstep = jax.jit(counted, donate_argnums=0)
  for t in range(3):
    state, metrics = jstep(state, _batch(t))
  assert len(traces) == 1
  assert bool(state.method_state["started"])
  assert all(np.isfinite(float(metrics["q"][m])) for m in NAMES)


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_heldout_estimators_data_parallel_equal_single_device(mode):
  method = arl_jax.ARL(estimator="heldout_variance", ema=0.5,
                       dependency="heldout")
  batches = [_batch(t, rows=64) for t in range(3)]
  state, step = _setup(method)
  single = jax.jit(step)
  for b in batches:
    state, ref_metrics = single(state, b)
  devices = jax.devices()[:8]
  if mode == "pmap":
    st, pstep = _setup(method, axis_name="batch")
    pstep = parallel.pmap_train_step(pstep, "batch", devices)
    st = parallel.replicate(st, devices, "batch")
    for b in batches:
      st, metrics = pstep(st, parallel.shard_batch(b, len(devices)))
    st, metrics = parallel.unreplicate(st), parallel.unreplicate(metrics)
  else:
    mesh = parallel.data_mesh(devices)
    st, step = _setup(method)
    jstep = parallel.jit_train_step(step, mesh)
    st = parallel.replicate_on_mesh(st, mesh)
    for b in batches:
      st, metrics = jstep(st, parallel.global_batch(b, mesh))
    st, metrics = parallel.fetch((st, metrics))
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
  jax.tree.map(close, jax.device_get(st.params), jax.device_get(state.params))
  for key in ("a", "q", "s"):
    jax.tree.map(close, jax.device_get(metrics[key]),
                 jax.device_get(ref_metrics[key]))


# ------------------------------------------------------- fusion weights --

def test_weighted_fusion_logits_of_an_additive_head():
  names = ("a", "b", "c")
  rng = np.random.default_rng(0)
  feats = {m: rng.normal(size=(10, 5)).astype(np.float32) for m in names}
  w_head = {m: rng.normal(size=(5, 3)).astype(np.float32) for m in names}
  bias = rng.normal(size=3).astype(np.float32)
  head = lambda f: sum(f[m] @ w_head[m] for m in f) + bias
  fused, unimodal = arl_jax.fused_and_unimodal_logits(head, feats)
  ones = fusion_weighting.weighted_fusion_logits(fused, unimodal,
                                                 dict.fromkeys(names, 1.0))
  np.testing.assert_allclose(ones, fused, rtol=1e-5, atol=1e-5)
  w = {"a": 0.2, "b": 1.5, "c": 0.0}
  got = fusion_weighting.weighted_fusion_logits(fused, unimodal, w)
  want = bias + sum(w[m] * (feats[m].astype(np.float64) @ w_head[m])
                    for m in names)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="'gated' fusion mixes the modalities"):
    fusion_weighting.check_additive("gated")


def test_check_additive_on_a_users_own_head():
  rng = np.random.default_rng(1)
  feats = {m: rng.normal(size=(8, 4)).astype(np.float32) for m in "ab"}
  w = {m: rng.normal(size=(4, 3)).astype(np.float32) for m in "ab"}
  additive = lambda f: f["a"] @ w["a"] + f["b"] @ w["b"] + 0.3
  fusion_weighting.check_additive(additive, feats)
  assert fusion_weighting.additivity_gap(additive, feats) < 1e-6
  gated = lambda f: jax.nn.sigmoid(f["a"] @ w["a"]) * (f["b"] @ w["b"])
  with pytest.raises(ValueError, match="mixes the modalities inside the head"):
    fusion_weighting.check_additive(gated, feats)
  with pytest.raises(TypeError, match="features="):
    fusion_weighting.check_additive(additive)


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated", "film"])
def test_eval_step_weighs_an_additive_head_and_refuses_the_others(fusion):
  from arl_jax import models
  names = ("audio", "visual")
  model = models.multiview_classifier({"audio": 6, "visual": 5}, 3,
                                      encoder_widths=(8,), fusion=fusion)
  rng = np.random.default_rng(2)
  x = {"audio": rng.normal(size=(16, 6)).astype(np.float32),
       "visual": rng.normal(size=(16, 5)).astype(np.float32)}
  y = rng.integers(0, 3, 16).astype(np.int32)
  params, model_state = models.init_model(model, jax.random.PRNGKey(0), x)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                    arl_jax.label_modalities(names))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(1))
  apply_fn = models.make_apply_fn(model)
  ev = jax.jit(arl_jax.make_eval_step(apply_fn))
  batch = {"inputs": x, "labels": y}
  w = {"audio": 0.25, "visual": 1.75}
  if fusion in ("gated", "film"):
    with pytest.raises(ValueError, match="mixes the modalities inside"):
      ev(state, batch, fusion_weights=w)
    return
  plain = ev(state, batch)
  got = ev(state, batch, fusion_weights=w)
  want = fusion_weighting.weighted_fusion_logits(
      plain["fused_logits"], plain["unimodal_logits"], w)
  np.testing.assert_allclose(got["fused_logits"], want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got["fused_logits"], plain["fused_logits"])
  np.testing.assert_array_equal(got["predictions"],
                                np.argmax(np.asarray(want), -1))
  assert float(got["correct"]) == float(np.sum(np.argmax(np.asarray(want), -1)
                                               == y))
  # A user's apply_fn without the head to check is refused, with the way out.
  bare = lambda *a, **k: apply_fn(*a, **k)
  with pytest.raises(ValueError, match="checks the model's head first"):
    arl_jax.make_eval_step(bare)(state, batch, fusion_weights=w)


def test_inverse_variance_weights_against_numpy():
  names = ("a", "b")
  z, y = _logits(5, names, batch=64)
  w = fusion_weighting.inverse_variance_weights(
      arl_jax.modality_statistics(z, y))
  inv = np.array([1 / np.var(_true_prob(z[m], y)) for m in names])
  np.testing.assert_allclose([w[m] for m in names], 2 * inv / inv.sum(),
                             rtol=1e-4)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_inverse_error_weights_against_numpy(names):
  z, y = _logits(6, names, batch=64)
  w = fusion_weighting.inverse_error_weights(arl_jax.modality_statistics(z, y))
  inv = np.array([1 / np.mean((1 - _true_prob(z[m], y)) ** 2) for m in names])
  np.testing.assert_allclose([w[m] for m in names],
                             len(names) * inv / inv.sum(), rtol=1e-4)


def test_a_modality_at_the_prior_gets_the_smallest_inverse_error_weight():
  # An informative modality against one stuck at the class prior: inverse
  # variance puts its largest weight on the prior (variance 0), inverse
  # error its smallest.
  rng = np.random.default_rng(3)
  y = rng.integers(0, 4, 500).astype(np.int32)
  z = {"good": (3.0 * np.eye(4)[y] + rng.normal(size=(500, 4))).astype(
      np.float32), "prior": np.zeros((500, 4), np.float32)}
  stats = arl_jax.modality_statistics(z, y)
  err = fusion_weighting.inverse_error_weights(stats)
  var = fusion_weighting.inverse_variance_weights(stats)
  assert float(err["prior"]) < float(err["good"])
  assert float(var["prior"]) > float(var["good"])


def test_fitted_weights_recover_the_generating_ones():
  rng = np.random.default_rng(0)
  n, c = 4000, 4
  terms = {m: rng.normal(size=(n, c)) * 2.0 for m in ("a", "b")}
  bias = np.array([0.3, -0.2, 0.0, 0.1])
  true_w = {"a": 0.3, "b": 1.6}
  logits = bias + sum(true_w[m] * terms[m] for m in terms)
  p = ref.softmax(logits)
  y = np.array([rng.choice(c, p=row) for row in p], np.int32)
  unimodal = {m: (bias + terms[m]).astype(np.float32) for m in terms}
  fused = (bias + terms["a"] + terms["b"]).astype(np.float32)
  w = fusion_weighting.fit_fusion_weights(fused, unimodal, y, steps=600)
  for m in terms:
    assert float(w[m]) == pytest.approx(true_w[m], rel=0.1)


# -------------------------------------------------------------- problems --

@pytest.mark.parametrize("setting", ["memorise_vs_parity", "three_modalities",
                                     "control"])
def test_imbalanced_problem_posteriors_are_calibrated(setting):
  """The closed-form Bayes posteriors match label frequencies (an
  independent check of the likelihoods behind the exact Bayes accuracy)."""
  problem = make_imbalanced(setting, sizes=(64, 64, 8000), seed=3)
  x, y = problem.splits["test"]
  lik = problem.log_likelihood(x)
  joint = sum(lik.values())
  for logp in [*lik.values(), joint]:
    post = ref.softmax(logp)
    conf = post.max(-1)
    hit = np.argmax(post, -1) == y
    for lo, hi in [(0.0, 0.6), (0.6, 0.85), (0.85, 1.01)]:
      sel = (conf >= lo) & (conf < hi)
      if sel.sum() > 300:
        assert abs(hit[sel].mean() - conf[sel].mean()) < 0.035
  acc = problem.unimodal_bayes_accuracy
  assert problem.bayes_accuracy > max(acc.values())
  assert len(acc) == (3 if setting == "three_modalities" else 2)
  np.testing.assert_allclose(problem.bayes_accuracy,
                             np.mean(np.argmax(joint, -1) == y))


def test_bad_imbalance_specs_are_named():
  from arl_jax.data import ModalitySpec
  with pytest.raises(ValueError, match="unknown imbalance setting"):
    make_imbalanced("nope")
  with pytest.raises(ValueError, match="power of two"):
    make_imbalanced({"a": ModalitySpec("parity", 8),
                     "b": ModalitySpec("gaussian", 4)}, num_classes=6)


def test_fit_fusion_weights_refuses_labels_out_of_range_and_bad_masks():
  z, y = _logits(7, ("a", "b"), batch=32)
  fused = z["a"] + z["b"]
  for bad in (np.where(np.arange(32) == 3, -1, y), np.where(
      np.arange(32) == 5, 4, y)):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
      fusion_weighting.fit_fusion_weights(fused, z, bad.astype(np.int32))
  with pytest.raises(ValueError, match=r"mask must have shape \[batch\]"):
    fusion_weighting.fit_fusion_weights(fused, z, y, np.ones((32, 1), bool))


def test_label_modalities_refuses_a_bare_string():
  with pytest.raises(TypeError, match="sequence of modality names"):
    arl_jax.label_modalities("audio")
  with pytest.raises(TypeError, match="must be strings"):
    arl_jax.label_modalities(["audio", 3])


def test_fusion_weights_one_entry_point_for_every_weighting():
  names = ("a", "b")
  z, y = _logits(7, names, batch=64)
  rng = np.random.default_rng(7)
  bias = rng.normal(size=4).astype(np.float32)
  fused = sum(z[m] for m in names) - bias
  stats = arl_jax.modality_statistics(z, y)
  want = {"inverse_variance": fusion_weighting.inverse_variance_weights(stats),
          "inverse_error": fusion_weighting.inverse_error_weights(stats),
          "calibrated": fusion_weighting.fit_fusion_weights(fused, z, y)}
  for kind in fusion_weighting.WEIGHTINGS:
    got = fusion_weighting.fusion_weights(kind, fused, z, y)
    for m in names:
      np.testing.assert_allclose(got[m], want[kind][m], rtol=1e-5)
  mask = np.arange(64) < 40
  masked = fusion_weighting.fusion_weights("inverse_error", fused, z, y, mask)
  cut = fusion_weighting.fusion_weights(
      "inverse_error", fused[:40], {m: v[:40] for m, v in z.items()}, y[:40])
  for m in names:
    np.testing.assert_allclose(masked[m], cut[m], rtol=1e-5)
  with pytest.raises(ValueError, match="kind must be one of"):
    fusion_weighting.fusion_weights("median", fused, z, y)
  with pytest.raises(ValueError, match="label"):
    fusion_weighting.fusion_weights("inverse_variance", fused, z, y + 10)
