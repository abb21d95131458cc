"""An NNX model (BatchNorm, Dropout) through the library's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import arl_jax
from arl_jax.models import nnx_apply_fn
from arl_jax.models import nnx_update_model

NAMES = ("audio", "visual")


class Encoder(nnx.Module):

  def __init__(self, d_in, rngs):
    self.linear = nnx.Linear(d_in, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    return self.drop(jax.nn.relu(self.norm(self.linear(x))))


class Model(nnx.Module):

  def __init__(self, rngs):
    self.audio = Encoder(6, rngs)        # named after the modality
    self.visual = Encoder(4, rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    feats = {m: getattr(self, m)(x[m]) for m in NAMES}
    return arl_jax.fused_and_unimodal_logits(
        lambda f: self.head(jnp.concatenate([f["audio"], f["visual"]], -1)),
        feats)


def _batch(seed, rows=16):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, rows).astype(np.int32)
  return {"inputs": {"audio": rng.normal(size=(rows, 6)).astype(np.float32)
                     + y[:, None],
                     "visual": rng.normal(size=(rows, 4)).astype(np.float32)},
          "labels": y}


def _setup():
  model = Model(nnx.Rngs(0, dropout=1))
  apply_fn, params, model_state = nnx_apply_fn(model)
  tx = arl_jax.with_modality_scales(optax.sgd(0.05, momentum=0.9),
                                    arl_jax.label_modalities(NAMES))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(2),
                                    method=arl_jax.ARL(),
                                    modalities=NAMES)
  return model, apply_fn, tx, state


def test_nnx_model_trains_through_make_train_step():
  model, apply_fn, tx, state = _setup()
  kept = lambda: (nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
  before = jax.tree.map(jnp.copy, kept())
  step = jax.jit(arl_jax.make_train_step(apply_fn, tx, arl_jax.ARL()))
  first = state
  for t in range(3):
    state, metrics = step(state, _batch(t))
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["update_skipped"]) == 0.0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state.params, first.params)
  assert moved["audio"]["linear"]["kernel"] > 0
  assert moved["head"]["kernel"] > 0
  # BatchNorm's running statistics are the model state, updated in training.
  assert not np.allclose(state.model_state["audio"]["norm"]["mean"],
                         first.model_state["audio"]["norm"]["mean"])
  # The user's model object is untouched by the step...
  jax.tree.map(np.testing.assert_array_equal, kept(), before)
  # ...until the trained state is written back.
  nnx_update_model(model, state.params, state.model_state)
  np.testing.assert_array_equal(model.head.kernel[...],
                                state.params["head"]["kernel"])
  np.testing.assert_array_equal(model.audio.norm.mean[...],
                                state.model_state["audio"]["norm"]["mean"])


def test_train_and_eval_modes_dropout_and_running_statistics():
  _, apply_fn, _, state = _setup()
  b = _batch(0)
  run = lambda train, rng, x=b["inputs"]: apply_fn(
      state.params, state.model_state, x, train=train, rng=rng)[0][0]
  k1, k2 = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  np.testing.assert_array_equal(run(True, k1), run(True, k1))
  assert not np.allclose(run(True, k1), run(True, k2))       # dropout masks
  # Evaluation: no dropout, running averages (a row's output does not depend
  # on the other rows of its batch).
  np.testing.assert_array_equal(run(False, k1), run(False, k2))
  alone = run(False, None, {m: v[:1] for m, v in b["inputs"].items()})
  np.testing.assert_allclose(alone[0], run(False, None)[0], rtol=1e-5,
                             atol=1e-6)
  # Evaluation leaves the state as it was.
  _, new_state = apply_fn(state.params, state.model_state, b["inputs"],
                          train=False, rng=None)
  assert new_state is state.model_state


def test_gradients_equal_nnx_grad_on_the_model():
  model, apply_fn, _, state = _setup()
  b = _batch(3)
  model.eval()

  def loss_of_model(m):
    fused, _ = m(b["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        fused, b["labels"]).mean()

  want = nnx.to_pure_dict(nnx.grad(loss_of_model)(model))

  def loss_of_params(p):
    (fused, _), _ = apply_fn(p, state.model_state, b["inputs"], train=False,
                             rng=None)
    return optax.softmax_cross_entropy_with_integer_labels(
        fused, b["labels"]).mean()

  got = jax.grad(loss_of_params)(state.params)
  jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5,
                                                       atol=1e-7), got, want)


def test_agm_and_eval_step_with_an_nnx_model():
  # A method that runs the model again with inputs zeroed (AGM), and the
  # eval step, on the same adapter.
  model = Model(nnx.Rngs(0, dropout=1))
  apply_fn, params, model_state = nnx_apply_fn(model)
  tx = arl_jax.with_modality_scales(optax.sgd(0.05),
                                    arl_jax.label_modalities(NAMES))
  method = arl_jax.AGM(schedule="warmup")
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(2), method=method,
                                    modalities=NAMES)
  step = jax.jit(arl_jax.make_train_step(apply_fn, tx, method))
  state, metrics = step(state, _batch(0))
  assert np.isfinite(float(metrics["loss"]))
  out = jax.jit(arl_jax.make_eval_step(apply_fn))(state, _batch(1))
  assert float(out["count"]) == 16
