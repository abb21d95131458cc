"""Masked rows, empty batches, OGM-GE, PMR and evaluation under data
parallelism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import parallel_runs
import pytest
from test_train_step import labels_of
from test_train_step import user_model_apply
from test_train_step import user_params

import arl_jax
from arl_jax import parallel
from arl_jax.data import iterate_batches
from arl_jax.data import make_linear_gaussian

close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)


def _setup(method, axis_name=None, adam=False, apply_fn=user_model_apply):
  params = user_params(jax.random.PRNGKey(0), {"audio": 5, "visual": 5}, 8, 3)
  opt = optax.adam(1e-2) if adam else optax.sgd(0.05, momentum=0.9)
  tx = arl_jax.with_modality_scales(opt, labels_of)
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(1), method=method,
                                    modalities=("audio", "visual"))
  return state, arl_jax.make_train_step(apply_fn, tx, method,
                                        axis_name=axis_name)


def _batch(rows=32, seed=0):
  problem = make_linear_gaussian({"audio": 1.0, "visual": 2.0}, num_classes=3,
                                 dim=5, sizes=(256, 8, 8), seed=seed)
  x, y = problem.splits["train"]
  return next(iterate_batches(x, y, rows))


# Every per-step rule (D&R's step is concat's; PMR and MLA: their own
# tests below and in test_mla.py). G-Blending's weights are its state.
METHODS = [arl_jax.ARL(temperature=4.0),
           arl_jax.OGMGE(alpha=0.5, schedule="warmup"), arl_jax.MMPareto(),
           arl_jax.AGM(schedule="warmup"), arl_jax.GBlending()]
IDS = ["arl", "ogm_ge", "mmpareto", "agm", "g_blending"]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_masked_rows_equal_the_step_on_the_unpadded_rows(method):
  batch = _batch()
  keep = np.ones(32, bool)
  keep[[1, 5, 6, 20, 31]] = False
  state, step = _setup(method)
  step = jax.jit(step)
  masked, m1 = step(state, {**batch, "mask": keep})
  short = jax.tree.map(lambda v: np.asarray(v)[keep], batch)
  unpadded, m2 = step(state, short)
  jax.tree.map(close, masked.params, unpadded.params)
  for key in ("loss", "accuracy", "a", "scale", "q", "s"):
    jax.tree.map(close, m1[key], m2[key])


def test_an_all_masked_batch_changes_nothing_and_stays_finite():
  batch = _batch()
  state, step = _setup(arl_jax.ARL())
  new, metrics = jax.jit(step)(state, {**batch, "mask": np.zeros(32, bool)})
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  assert float(metrics["loss"]) == 0.0 and float(metrics["update_skipped"]) == 0
  assert [float(v) for v in metrics["a"].values()] == [0.5, 0.5]


def _uneven_mask():
  # 4 devices x 8 rows: 8, 5, 0 and 3 valid rows.
  mask = np.zeros(32, bool)
  mask[0:8] = True
  mask[8:13] = True
  mask[24:27] = True
  return mask


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_uneven_valid_rows_per_device_equal_one_device(method, mode):
  batches = [{**_batch(seed=s), "mask": _uneven_mask()} for s in range(2)]
  state, step = _setup(method, adam=True)
  one = jax.jit(step)
  for b in batches:
    state, ref_metrics = one(state, b)
  devices = jax.devices()[:4]
  st, pstep = _setup(method, axis_name="batch" if mode == "pmap" else None,
                     adam=True)
  st, metrics = parallel_runs.run_steps(st, pstep, batches, mode, devices)
  # Parameters, the Adam moments and OGM-GE's noise key all agree.
  jax.tree.map(close, jax.device_get(st.params), jax.device_get(state.params))
  jax.tree.map(close, jax.device_get(st.opt_state),
               jax.device_get(state.opt_state))
  for key in ("loss", "a", "scale"):
    jax.tree.map(close, jax.device_get(metrics[key]),
                 jax.device_get(ref_metrics[key]))


def _apply_with_features(params, model_state, inputs, *, train, rng):
  """``user_model_apply`` that also returns the encoders' features (PMR)."""
  del train, rng
  feats = {m: jnp.tanh(inputs[m] @ params[m]["w"]) for m in inputs}
  head = lambda f: sum(f[m] @ params["head"][m] for m in f) + params["head"]["b"]
  fused, unimodal = arl_jax.fused_and_unimodal_logits(head, feats)
  return (fused, unimodal, feats), model_state


def _pmr_batches(count=2):
  # Audio almost noiseless: its features cluster around its class means.
  problem = make_linear_gaussian({"audio": 0.1, "visual": 2.0}, num_classes=3,
                                 dim=5, sizes=(256, 8, 8), seed=0)
  x, y = problem.splits["train"]
  batches = iterate_batches(x, y, 32)
  return [{**next(batches), "mask": _uneven_mask()} for _ in range(count)]


def _pmr_setup(axis_name=None):
  """PMR with its prototypes set: audio's are its class means on the first
  batch, visual's far random points (rho > 1: visual's prototype loss on)."""
  state, step = _setup(arl_jax.PMR(schedule="warmup"), axis_name=axis_name,
                       adam=True, apply_fn=_apply_with_features)
  (batch,) = _pmr_batches(1)
  (_, _, feats), _ = _apply_with_features(state.params, None, batch["inputs"],
                                          train=False, rng=None)
  rng = np.random.default_rng(3)
  prototypes = {
      "audio": arl_jax.methods.pmr.class_means(
          np.asarray(feats["audio"]), batch["labels"], 3),
      "visual": 2.0 * rng.normal(size=(3, 8))}
  state = state.replace(method_state={"prototypes": {
      m: jnp.asarray(v, jnp.float32) for m, v in prototypes.items()}})
  return state, step


@functools.cache
def _pmr_runs(mode):
  """Two PMR steps on one device and over 4 devices (``mode``), on host."""
  # Uneven valid rows per device: rho's class probabilities are means over
  # the global batch (LossContext.global_mean), not per device.
  batches = _pmr_batches()
  state, step = _pmr_setup()
  one = jax.jit(step)
  for b in batches:
    state, ref_metrics = one(state, b)
  devices = jax.devices()[:4]
  st, pstep = _pmr_setup(axis_name="batch" if mode == "pmap" else None)
  st, metrics = parallel_runs.run_steps(st, pstep, batches, mode, devices)
  return jax.device_get((state, ref_metrics, st, metrics))


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_pmr_data_parallel_equals_one_device(mode):
  state, ref_metrics, st, metrics = _pmr_runs(mode)
  assert float(ref_metrics["pmr_rho"]) > 1.1       # far from the switch
  assert float(ref_metrics["pmr_weight"]["visual"]) == 1.0
  jax.tree.map(close, st.params, state.params)
  jax.tree.map(close, st.opt_state, state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, st.method_state,
               state.method_state)
  # prototype_loss is a metric of the global batch under pmap too.
  for key in ("loss", "pmr_rho", "pmr_weight", "prototype_loss"):
    jax.tree.map(close, metrics[key], ref_metrics[key])


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_eval_step_data_parallel_equals_one_device(mode):
  from experiments import distributed
  batch = {**_batch(), "mask": _uneven_mask()}
  state, _ = _setup(arl_jax.ARL())
  eval_step = arl_jax.make_eval_step(user_model_apply)
  want = jax.device_get(jax.jit(eval_step)(state, batch))
  topology = distributed.Topology(
      mode=mode, devices=jax.devices()[:4], process_index=0, process_count=1,
      mesh=parallel.data_mesh(jax.devices()[:4]) if mode == "jit" else None)
  got = topology.eval_step(eval_step)(topology.put_state(state), batch)
  assert float(got["count"]) == 16.0
  for key in ("count", "correct", "loss_sum", "unimodal_correct",
              "predictions", "labels", "valid", "fused_logits"):
    jax.tree.map(close, got[key], want[key])
