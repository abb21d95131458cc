"""ARL's scales must act with every optimiser, label any pytree, accumulate."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import arl_jax
from arl_jax.data import iterate_batches
from arl_jax.data import make_linear_gaussian

NAMES = ("audio", "visual")
PARAMS = {"audio": {"w": jnp.arange(1.0, 7.0).reshape(2, 3)},
          "visual": {"w": jnp.full((3,), 2.0)}, "head": {"w": jnp.ones(4)}}


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                            jnp.float32), PARAMS)


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
    "rmsprop": lambda: optax.rmsprop(1e-2),
}


@pytest.mark.parametrize("name", ["adamw", "lion", "rmsprop"])
def test_scale_before_a_normalising_optimiser_cancels(name):
  """What the README used to recommend: the scale has no effect at all."""
  tx = optax.chain(arl_jax.scale_by_modality(arl_jax.label_modalities(NAMES)),
                   OPTIMIZERS[name]())
  state = tx.init(PARAMS)
  u1, _ = tx.update(_grads(0), state, PARAMS,
                    modality_scales={"audio": 1.0, "visual": 1.0})
  u2, _ = tx.update(_grads(0), state, PARAMS,
                    modality_scales={"audio": 1.9, "visual": 1.0})
  np.testing.assert_allclose(u2["audio"]["w"], u1["audio"]["w"], rtol=1e-5)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_with_modality_scales_acts_with_every_optimiser(name):
  """The documented way: update of encoder m is scaled by s_m, every step."""
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(OPTIMIZERS[name](), labels)
  plain = OPTIMIZERS[name]()
  state, plain_state = tx.init(PARAMS), plain.init(PARAMS)
  for step in range(4):
    scales = {"audio": 1.0 + 0.3 * step, "visual": 1.0}
    g = _grads(step)
    u, state = tx.update(g, state, PARAMS, modality_scales=scales)
    ref, plain_state = plain.update(g, plain_state, PARAMS)
    if name == "sgd":
      continue      # gradient placement: momentum mixes past scales, below
    np.testing.assert_allclose(u["audio"]["w"],
                               scales["audio"] * ref["audio"]["w"], rtol=1e-5)
    np.testing.assert_allclose(u["visual"]["w"], ref["visual"]["w"], rtol=1e-6)
    np.testing.assert_allclose(u["head"]["w"], ref["head"]["w"], rtol=1e-6)


def test_auto_placement_is_the_papers_gradient_scaling_under_sgd():
  """SGD + momentum + clip + coupled decay is affine: scale the gradient."""
  labels = arl_jax.label_modalities(NAMES)
  opt = lambda: optax.chain(optax.clip_by_global_norm(40.0),
                            optax.add_decayed_weights(1e-4),
                            optax.sgd(0.1, momentum=0.9))
  auto = arl_jax.with_modality_scales(opt(), labels)
  paper = optax.chain(arl_jax.scale_by_modality(labels), opt())
  assert arl_jax.optimizer_checks.optimizer_is_affine(opt(), PARAMS)
  assert not arl_jax.optimizer_checks.optimizer_is_affine(optax.adamw(1e-3),
                                                          PARAMS)
  sa, sp = auto.init(PARAMS), paper.init(PARAMS)
  for step in range(4):
    scales = {"audio": 1.0 + 0.3 * step, "visual": 1.5 - 0.1 * step}
    ua, sa = auto.update(_grads(step), sa, PARAMS, modality_scales=scales)
    up, sp = paper.update(_grads(step), sp, PARAMS, modality_scales=scales)
    jax.tree.map(np.testing.assert_array_equal, ua, up)
  # Explicit placements are honoured, and checked.
  with pytest.raises(ValueError, match="placement must be"):
    arl_jax.with_modality_scales(opt(), labels, placement="before")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_auto_placement_with_lr_warmup_from_zero_and_half_precision(dtype):
  # The first update of a schedule warmed up from 0 is zero, and half
  # precision rounds above the probe's tolerance: neither may turn SGD's
  # paper placement into "update", nor hide a scale cancelled by Adam.
  labels = arl_jax.label_modalities(NAMES)
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  warm = optax.linear_schedule(0.0, 0.1, transition_steps=10)
  for opt in (optax.sgd(warm, momentum=0.9), optax.sgd(0.1, momentum=0.9)):
    tx = arl_jax.with_modality_scales(opt, labels)
    tx.init(params)
    assert arl_jax.modality_scale_placement(tx, params) == "gradient"
  for opt in (optax.adamw(warm), optax.adamw(1e-3)):
    tx = arl_jax.with_modality_scales(opt, labels)
    assert arl_jax.modality_scale_placement(tx, params) == "update"
    before = optax.chain(arl_jax.scale_by_modality(labels), opt)
    assert arl_jax.optimizer_checks.scales_take_effect(
        before, params, NAMES) is False
  fixed = arl_jax.with_modality_scales(optax.adamw(1e-3), labels,
                                       placement="gradient")
  assert arl_jax.modality_scale_placement(fixed, params) == "gradient"
  with pytest.raises(ValueError, match="built by arl_jax.with_modality"):
    arl_jax.modality_scale_placement(optax.sgd(0.1), params)


def test_with_modality_scales_under_jit_and_with_noise():
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.adam(1e-2), labels)
  state = jax.jit(tx.init)(PARAMS)
  step = jax.jit(functools.partial(tx.update, params=PARAMS))
  s = {"audio": jnp.float32(2.0), "visual": jnp.float32(1.0)}
  u, state = step(_grads(0), state, modality_scales=s)
  plain, _ = optax.adam(1e-2).update(_grads(0), optax.adam(1e-2).init(PARAMS))
  np.testing.assert_allclose(u["audio"]["w"], 2 * plain["audio"]["w"],
                             rtol=1e-5)
  u2, _ = step(_grads(0), state, modality_scales=s,
               modality_noise={"audio": 1.0, "visual": 0.0})
  assert not np.allclose(u2["audio"]["w"], u["audio"]["w"])


# ----------------------------------------------------------- train step --

def _apply(params, model_state, inputs, *, train, rng):
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]["w"]) for m in inputs}
  head = lambda f: sum(f[m] @ params["head"][m] for m in f) + params["head"]["b"]
  return arl_jax.fused_and_unimodal_logits(head, feats), model_state


def _params(seed=0, dim=5, width=8, classes=3):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  p = {m: {"w": jax.random.normal(keys[i], (dim, width)) / np.sqrt(dim)}
       for i, m in enumerate(NAMES)}
  p["head"] = {m: 0.1 * jax.random.normal(keys[2 + i], (width, classes))
               for i, m in enumerate(NAMES)}
  p["head"]["b"] = jnp.zeros(classes)
  return p


def _problem():
  problem = make_linear_gaussian({"audio": 1.0, "visual": 2.0}, num_classes=3,
                                 dim=5, sizes=(256, 64, 64))
  return problem.splits["train"]


def _distance_moved(tx, method, steps=20, check_tx=True):
  x, y = _problem()
  p0 = _params()
  state = arl_jax.TrainState.create(params=p0, tx=tx, rng=jax.random.PRNGKey(1))
  step = jax.jit(arl_jax.make_train_step(_apply, tx, method,
                                         check_tx=check_tx))
  batches = iterate_batches(x, y, 32, shuffle=True, epoch=0)
  for _, batch in zip(range(steps), batches):
    state, metrics = step(state, batch)
  return {m: float(optax.tree.norm(jax.tree.map(jnp.subtract, state.params[m],
                                                p0[m]))) for m in NAMES}, metrics


def test_train_step_refuses_scales_that_cancel_and_says_where_to_put_them():
  labels = arl_jax.label_modalities(NAMES)
  wrong = optax.chain(arl_jax.scale_by_modality(labels), optax.adamw(1e-2))
  with pytest.raises(ValueError, match=r"after the optimiser.*"
                     "with_modality_scales.*check_tx=False"):
    _distance_moved(wrong, arl_jax.ARL(), steps=1)
  # Opting out trains, and shows why it is refused: ARL moves the encoders
  # exactly as far as the unimodal-regularisation ablation it extends.
  arl, _ = _distance_moved(wrong, arl_jax.ARL(), check_tx=False)
  ur, _ = _distance_moved(wrong, arl_jax.UnimodalRegularisation(),
                          check_tx=False)
  for m in NAMES:
    assert arl[m] == pytest.approx(ur[m], rel=1e-3)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_arl_takes_effect_with_the_documented_optimiser(name):
  labels = arl_jax.label_modalities(NAMES)
  tx = lambda: arl_jax.with_modality_scales(OPTIMIZERS[name](), labels)
  arl, metrics = _distance_moved(tx(), arl_jax.ARL(temperature=4.0))
  ur, _ = _distance_moved(tx(), arl_jax.UnimodalRegularisation())
  # Scales are 1 + a_m with a_m in (0, 1): the encoders must move further
  # (the wrong placement above moves them exactly as far).
  ratio = {m: arl[m] / ur[m] for m in NAMES}
  assert all(r > 1.05 for r in ratio.values()), ratio
  assert all(1.0 < float(metrics["scale"][m]) < 2.0 for m in NAMES)


def test_chain_after_the_optimiser_passes_the_check():
  labels = arl_jax.label_modalities(NAMES)
  tx = optax.chain(optax.adamw(1e-2), arl_jax.scale_by_modality(labels))
  moved, _ = _distance_moved(tx, arl_jax.ARL(), steps=2)
  assert all(np.isfinite(v) for v in moved.values())


# ------------------------------------------------------------ labelling --

class NNXModel(nnx.Module):

  def __init__(self, rngs):
    self.audio = nnx.Linear(5, 8, rngs=rngs)
    self.visual = nnx.Linear(5, 8, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    feats = {m: jnp.tanh(getattr(self, m)(x[m])) for m in NAMES}
    return arl_jax.fused_and_unimodal_logits(
        lambda f: self.head(jnp.concatenate([f["audio"], f["visual"]], -1)),
        feats)


@pytest.mark.parametrize("labels", [
    arl_jax.label_modalities(NAMES),
    {"audio": "audio", "visual": "visual", "head": "head"},   # prefix dict
])
def test_nnx_optimizer_with_path_labels(labels):
  model = NNXModel(nnx.Rngs(0))
  tx = arl_jax.with_modality_scales(optax.adam(1e-2), labels)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(jnp.copy, before)
  x = {m: jax.random.normal(jax.random.PRNGKey(i), (4, 5))
       for i, m in enumerate(NAMES)}
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0]))(model)
  opt.update(model, grads, modality_scales={"audio": 2.0, "visual": 1.0})
  after = nnx.state(model, nnx.Param)
  moved = jax.tree.map(lambda a, b: jnp.abs(a - b), after, before)
  # First Adam step: |update| = lr for every coordinate, times the scale.
  np.testing.assert_allclose(moved["audio"]["kernel"][...], 2e-2, rtol=1e-3)
  np.testing.assert_allclose(moved["visual"]["kernel"][...], 1e-2, rtol=1e-3)
  np.testing.assert_allclose(moved["head"]["kernel"][...], 1e-2, rtol=1e-3)


@pytest.mark.parametrize("labels,modalities", [
    (arl_jax.label_modalities(NAMES), None),    # it knows the modalities
    ({"audio": "audio", "visual": "visual", "head": "head"}, NAMES),
])
def test_nnx_update_with_a_modality_left_out_is_refused(labels, modalities):
  # A scale left out would leave that encoder unscaled without a word.
  model = NNXModel(nnx.Rngs(0))
  tx = arl_jax.with_modality_scales(optax.sgd(1e-2), labels,
                                    modalities=modalities)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = {m: jnp.ones((4, 5)) for m in NAMES}
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0]))(model)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match=r"modality_scales has keys \['audio'\] "
                     r"but this transformation was built for modalities "
                     r"\['audio', 'visual'\]"):
    opt.update(model, grads, modality_scales={"audio": 2.0})
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
               before)                              # nothing moved


def test_scale_by_modality_inside_an_optax_partition_group():
  labels = arl_jax.label_modalities(NAMES)
  groups = {"audio": "enc", "visual": "enc", "head": "head"}
  tx = optax.partition(
      {"enc": arl_jax.with_modality_scales(optax.adam(1e-2), labels),
       "head": optax.sgd(0.1)}, groups)
  state = tx.init(PARAMS)
  u, _ = tx.update(_grads(0), state, PARAMS,
                   modality_scales={"audio": 3.0, "visual": 1.0})
  plain, _ = optax.adam(1e-2).update(_grads(0), optax.adam(1e-2).init(PARAMS))
  np.testing.assert_allclose(u["audio"]["w"], 3 * plain["audio"]["w"],
                             rtol=1e-5)
  np.testing.assert_allclose(u["head"]["w"], -0.1 * _grads(0)["head"]["w"],
                             rtol=1e-6)


def test_auto_named_linen_encoders_get_a_hint():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.Dense(4)(x["audio"])) + nn.Dense(3)(x["visual"])

  params = Model().init(jax.random.PRNGKey(0),
                        {m: jnp.ones((1, 2)) for m in NAMES})["params"]
  tx = arl_jax.scale_by_modality(arl_jax.label_modalities(NAMES))
  with pytest.raises(ValueError, match="label no parameter.*"
                     "Name each encoder's module after its modality"):
    tx.update(params, tx.init(params), params,
              modality_scales={"audio": 1.0, "visual": 1.0})


# ---------------------------------------------------------- accumulation --

@pytest.mark.parametrize("masked", [False, True])
def test_accumulation_equals_one_step_on_the_whole_batch(masked):
  x, y = _problem()
  batch = next(iterate_batches(x, y, 64, shuffle=True, epoch=0))
  if masked:   # uneven valid rows per micro-batch, one micro-batch empty
    mask = np.ones(64, bool)
    mask[16:32] = False
    mask[40:45] = False
    batch = {**batch, "mask": jnp.asarray(mask)}
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1, momentum=0.9), labels)
  method = arl_jax.ARL(temperature=4.0)
  state = arl_jax.TrainState.create(params=_params(), tx=tx,
                                    rng=jax.random.PRNGKey(1))
  one = jax.jit(arl_jax.make_train_step(_apply, tx, method))
  four = jax.jit(arl_jax.make_train_step(_apply, tx, method,
                                         accumulation_steps=4))
  s1, m1 = one(state, batch)
  s4, m4 = four(state, batch)
  s1, m1 = one(s1, batch)           # twice: momentum state agrees too
  s4, m4 = four(s4, batch)
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
  jax.tree.map(close, s4.params, s1.params)
  for key in ("loss", "accuracy", "grad_norm"):
    close(m4[key], m1[key])
  for key in ("a", "q", "s", "scale"):
    jax.tree.map(close, m4[key], m1[key])


def test_accumulation_rejects_a_batch_that_does_not_split():
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1), labels)
  state = arl_jax.TrainState.create(params=_params(), tx=tx,
                                    rng=jax.random.PRNGKey(1))
  step = arl_jax.make_train_step(_apply, tx, arl_jax.ARL(),
                                 accumulation_steps=3)
  x, y = _problem()
  with pytest.raises(ValueError, match="32 rows does not split into "
                     "accumulation_steps=3"):
    step(state, next(iterate_batches(x, y, 32)))
  with pytest.raises(ValueError, match="accumulation_steps must be an "
                     "integer >= 1"):
    arl_jax.make_train_step(_apply, tx, arl_jax.ARL(), accumulation_steps=0)


# ------------------------------------------------------- invalid inputs --

def _step_and_state(method=None, **kwargs):
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1, momentum=0.9), labels)
  state = arl_jax.TrainState.create(params=_params(), tx=tx,
                                    rng=jax.random.PRNGKey(1))
  step = arl_jax.make_train_step(_apply, tx, method or arl_jax.ARL(), **kwargs)
  return jax.jit(step), state


def test_out_of_range_labels_never_train_under_jit():
  step, state = _step_and_state()
  x, y = _problem()
  batch = next(iterate_batches(x, y, 32))
  bad = np.asarray(batch["labels"]).copy()
  bad[3], bad[7] = -1, 3                 # C = 3
  s_bad, m_bad = step(state, {**batch, "labels": jnp.asarray(bad)})
  keep = np.ones(32, bool)
  keep[[3, 7]] = False
  s_ref, m_ref = step(state, {**batch, "mask": jnp.asarray(keep)})
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               s_bad.params, s_ref.params)
  assert float(m_bad["invalid_labels"]) == 2.0
  assert float(m_ref["invalid_labels"]) == 0.0
  assert float(m_bad["update_skipped"]) == 0.0
  for m in NAMES:
    assert np.isfinite(float(m_bad["a"][m]))
    np.testing.assert_allclose(m_bad["a"][m], m_ref["a"][m], rtol=1e-6)
  # Evaluation leaves them out of the count and reports them.
  ev = jax.jit(arl_jax.make_eval_step(_apply))(
      s_bad, {**batch, "labels": jnp.asarray(bad)})
  assert float(ev["count"]) == 30 and float(ev["invalid_labels"]) == 2
  # The pure functions under jit: finite, equal to dropping the rows.
  logits = {m: jax.random.normal(jax.random.PRNGKey(i), (32, 3))
            for i, m in enumerate(NAMES)}
  a_bad = jax.jit(lambda l, y: arl_jax.arl_coefficients(l, y, 4.0))(
      logits, jnp.asarray(bad))
  a_ref = arl_jax.arl_coefficients({m: v[keep] for m, v in logits.items()},
                                   np.asarray(batch["labels"])[keep], 4.0)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5),
               a_bad, a_ref)
  fused = logits["audio"]
  loss_bad = jax.jit(arl_jax.arl_loss, static_argnums=())(
      fused, logits, jnp.asarray(bad), 4.0)
  loss_ref = arl_jax.arl_loss(fused[keep], {m: v[keep] for m, v in
                                            logits.items()},
                              np.asarray(batch["labels"])[keep], 4.0)
  np.testing.assert_allclose(loss_bad, loss_ref, rtol=1e-6)


def test_negative_gamma_and_warmup_are_rejected():
  with pytest.raises(ValueError, match="gamma must be >= 0"):
    arl_jax.ARL(gamma=-1.0)
  with pytest.raises(ValueError, match="warmup_gamma must be >= 0"):
    arl_jax.UnimodalRegularisation(warmup_gamma=-0.5)
  with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
    _step_and_state(warmup_steps=-3)


def test_traced_temperature_not_positive_gives_neutral_coefficients():
  logits = {m: jax.random.normal(jax.random.PRNGKey(i), (16, 4)) * (1 + i)
            for i, m in enumerate(NAMES)}
  y = jnp.arange(16) % 4
  coef = jax.jit(lambda t: arl_jax.arl_coefficients(logits, y, t))
  for t in (0.0, -4.0):
    a = coef(jnp.float32(t))
    for m in NAMES:
      assert float(a[m]) == 0.5
  assert float(coef(jnp.float32(4.0))["audio"]) != 0.5
  # Through the step: the method's temperature traced (a sweep over T with
  # vmap or jit), flagged in the metrics.
  step, state = _step_and_state()
  x, yy = _problem()
  batch = next(iterate_batches(x, yy, 32))
  labels = arl_jax.label_modalities(NAMES)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1), labels)

  @jax.jit
  def run(t):
    step = arl_jax.make_train_step(_apply, tx, arl_jax.ARL(temperature=t))
    st = arl_jax.TrainState.create(params=_params(), tx=tx,
                                   rng=jax.random.PRNGKey(1))
    return step(st, batch)[1]

  bad, good = run(jnp.float32(-1.0)), run(jnp.float32(4.0))
  assert float(bad["invalid_temperature"]) == 1.0
  assert float(good["invalid_temperature"]) == 0.0
  assert float(bad["a"]["audio"]) == 0.5
