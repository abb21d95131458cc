"""Each method's schedule as its official code runs it (issue 23).

OGM-GE, AGM and PMR modulate inside an epoch window ``modulation_starts <=
epoch <= modulation_ends`` (0-based); the windowed step must equal,
bit for bit, the official loop transcribed by hand: a step that modulates
inside the window and one that does not outside it. D&R's re-initialisation
epochs are the official ones at 90 epochs and scaled to shorter runs; MLA's
batch gate is one gate per ``gate_batch`` evaluation rows, whatever the
evaluation batch size.
"""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
from test_masks_and_parallel_steps import _apply_with_features
from test_masks_and_parallel_steps import _batch
from test_masks_and_parallel_steps import _pmr_setup
from test_masks_and_parallel_steps import _setup
from test_runner import tiny_synthetic
from test_train_step import labels_of
from test_train_step import user_model_apply
from test_train_step import user_params

import arl_jax
from arl_jax.methods import mla as mla_lib
from experiments import configs
from experiments import train
from experiments.configs import uci

STEPS_PER_EPOCH = 3
EPOCHS = 5
WINDOW = (1, 2)
NEVER = 10 ** 9


def _official_loop(windowed, warm, state, batches, window=WINDOW):
  """The windowed step over ``batches`` and the official loop: each epoch
  ``starts <= epoch <= ends`` takes the modulating step, any other the plain
  one (the same method built with ``schedule="warmup"``)."""
  on = jax.jit(arl_jax.make_train_step(user_model_apply, warm[0], warm[1]))
  off = jax.jit(arl_jax.make_train_step(user_model_apply, warm[0], warm[1],
                                        warmup_steps=NEVER))
  step = jax.jit(windowed)
  ours, ref, metrics = state, state, []
  for t, b in enumerate(batches):
    epoch = t // STEPS_PER_EPOCH
    ours, m = step(ours, b)
    ref, _ = (on if window[0] <= epoch <= window[1] else off)(ref, b)
    metrics.append(jax.device_get(m))
  return ours, ref, metrics


def _batches():
  return [_batch(seed=t) for t in range(STEPS_PER_EPOCH * EPOCHS)]


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a),
               jax.device_get(b))


@pytest.mark.parametrize("name", ["ogm_ge", "agm"])
def test_window_equals_the_official_loop_bit_for_bit(name):
  method = arl_jax.make_method(name, modulation_starts=WINDOW[0],
                               modulation_ends=WINDOW[1],
                               **({"alpha": 0.5} if name == "ogm_ge" else {}))
  warm = dataclasses.replace(method, schedule="warmup")
  state, _ = _setup(warm)
  tx = arl_jax.with_modality_scales(optax.sgd(0.05, momentum=0.9), labels_of)
  windowed = arl_jax.make_train_step(user_model_apply, tx, method,
                                     steps_per_epoch=STEPS_PER_EPOCH)
  ours, ref, metrics = _official_loop(windowed, (tx, warm), state, _batches())
  _equal(ours.params, ref.params)
  _equal(ours.opt_state, ref.opt_state)
  _equal(ours.method_state, ref.method_state)
  off = [t // STEPS_PER_EPOCH not in range(WINDOW[0], WINDOW[1] + 1)
         for t in range(len(metrics))]
  assert [bool(m["warmup"]) for m in metrics] == off
  scales = np.array([[float(m["scale"][k]) for k in ("audio", "visual")]
                     for m in metrics])
  coefficients = np.array([[float(m["a"][k]) for k in ("audio", "visual")]
                           for m in metrics])
  if name == "ogm_ge":
    # Outside the window: no modulation; inside: k_m (one of them < 1).
    np.testing.assert_array_equal(scales[np.array(off)], 1.0)
    assert np.all(scales[~np.array(off)].min(axis=1) < 1.0)
  else:
    # AGM's c_m: 1 before the window, recomputed in it, then held at the
    # window's last value; its running scores update at every step.
    last_in = STEPS_PER_EPOCH * (WINDOW[1] + 1) - 1
    np.testing.assert_array_equal(coefficients[:STEPS_PER_EPOCH], 1.0)
    assert np.all(coefficients[STEPS_PER_EPOCH:last_in + 1] != 1.0)
    np.testing.assert_array_equal(
        coefficients[last_in + 1:],
        np.broadcast_to(coefficients[last_in], coefficients[last_in + 1:].shape))
    assert int(ours.method_state["t"]) == len(metrics)


def test_pmr_prototype_terms_act_in_the_window_only():
  state, _ = _pmr_setup()       # prototypes set, adam (as _setup's)
  method = arl_jax.PMR(modulation_starts=1, modulation_ends=1)
  tx = arl_jax.with_modality_scales(optax.adam(1e-2), labels_of)
  step = jax.jit(arl_jax.make_train_step(_apply_with_features, tx, method,
                                         steps_per_epoch=2))
  weights = []
  for t in range(6):
    state, m = step(state, {**_batch(seed=t)})
    weights.append(sum(float(v) for v in m["pmr_weight"].values()))
  # Epochs 0, 1, 2 of two steps: the prototype term only in epoch 1.
  assert weights[0] == weights[1] == weights[4] == weights[5] == 0.0
  assert weights[2] > 0 and weights[3] > 0


def test_window_needs_steps_per_epoch_and_no_warmup():
  tx = arl_jax.with_modality_scales(optax.sgd(0.1), labels_of)
  with pytest.raises(ValueError, match="pass steps_per_epoch="):
    arl_jax.make_train_step(user_model_apply, tx, arl_jax.OGMGE())
  with pytest.raises(ValueError, match="replaces the warm-up"):
    arl_jax.make_train_step(user_model_apply, tx, arl_jax.AGM(),
                            steps_per_epoch=4, warmup_steps=8)
  # schedule="warmup": the shared warm-up, as before.
  arl_jax.make_train_step(user_model_apply, tx,
                          arl_jax.OGMGE(schedule="warmup"), warmup_steps=8)
  with pytest.raises(ValueError, match="schedule must be one of"):
    arl_jax.PMR(schedule="always")
  with pytest.raises(ValueError, match="modulation_ends .3. is before"):
    arl_jax.OGMGE(modulation_starts=5, modulation_ends=3)
  with pytest.raises(ValueError, match="modulation_starts must be an integer"):
    arl_jax.AGM(modulation_starts=-1)
  assert arl_jax.OGMGE().modulation_window() == (0, 50)
  assert arl_jax.AGM().modulation_window() == (0, 20)
  assert arl_jax.PMR().modulation_window() == (0, 100)
  assert arl_jax.PMR(schedule="warmup").modulation_window() is None
  assert arl_jax.ARL().modulation_window() is None


def test_runner_replaces_the_warmup_by_the_window(tmp_path):
  c = tiny_synthetic(epochs=3, **{"method.name": "ogm_ge",
                                  "method.modulation_starts": 1,
                                  "method.modulation_ends": 1})
  c.warmup_epochs = 2
  report = train.train_and_evaluate(c, tmp_path / "ogm")
  assert report["warmup_epochs"] == 0
  assert tuple(report["modulation_window"]) == (1, 1)
  history = [json.loads(line) for line in
             (tmp_path / "ogm" / "metrics.jsonl").read_text().splitlines()]
  assert [h["warmup"] for h in history] == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------- D&R --

def test_dr_schedule_is_the_official_one_at_90_epochs_and_scaled_below():
  dr = arl_jax.DiagnoseRelearn()
  assert dr.reinit_epochs(90) == (20, 40, 60)       # the official script
  assert dr.reinit_epochs(30) == (7, 13, 20)
  assert dr.reinit_epochs(20) == (4, 9, 13)
  assert dr.reinit_epochs(180) == (40, 80, 120)
  literal = arl_jax.DiagnoseRelearn(run_epochs=0)
  assert literal.reinit_epochs(90) == (20, 40, 60)
  assert literal.reinit_epochs(30) == (20,)          # once, as before
  with pytest.raises(ValueError, match="num_epochs="):
    dr.reinit_epochs(None)
  with pytest.raises(ValueError, match="run_epochs must be"):
    arl_jax.DiagnoseRelearn(run_epochs=-1)


def test_dr_hook_fires_after_the_scaled_epochs_only():
  names = ("audio", "visual")
  method = arl_jax.DiagnoseRelearn()
  params = user_params(jax.random.PRNGKey(0), {m: 5 for m in names}, 8, 3)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1), labels_of)
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(1), method=method,
                                    modalities=names)
  y = np.repeat(np.arange(3), 10)
  rng = np.random.default_rng(0)
  features = lambda split: ({m: rng.normal(size=(30, 4)) for m in names}, y)
  context = arl_jax.EpochContext(modalities=names, num_classes=3,
                                 features=features, num_epochs=30)
  fired = []
  for epoch in range(1, 31):              # the runner's epochs, from 1
    state, record = method.epoch_end(epoch, state, context)
    if record:
      fired.append(epoch - 1)
  assert fired == [7, 13, 20]


# ------------------------------------------------------------------- MLA --

def _unimodal(rows, seed=0):
  rng = np.random.default_rng(seed)
  return {m: rng.normal(0, 2, (rows, 4)).astype(np.float32)
          for m in ("audio", "visual")}


def test_grouped_gate_matches_numpy_per_group():
  z = _unimodal(24)
  valid = np.ones(24, bool)
  valid[20:] = False                              # a padded last group
  got = np.asarray(arl_jax.MLA(gate_batch=8).eval_logits(None, z, valid))
  for start in range(0, 24, 8):
    rows = slice(start, start + 8)
    v = valid[rows]
    if not v.any():
      continue
    ent = {}
    for m, x in z.items():
      x = np.float64(x[rows][v])
      p = np.exp(x - x.max(0)) / np.exp(x - x.max(0)).sum(0)
      ent[m] = -np.sum(p * np.log(p))
    e = np.array([ent["audio"], ent["visual"]])
    g = np.exp(-e - (-e).max()) / np.exp(-e - (-e).max()).sum()
    want = g[0] * z["audio"][rows] + g[1] * z["visual"][rows]
    np.testing.assert_allclose(got[rows][v], want[v], rtol=1e-5, atol=1e-6)


def test_batch_gate_does_not_depend_on_the_evaluation_batch_size():
  names = ("audio", "visual")
  params = user_params(jax.random.PRNGKey(0), {m: 5 for m in names}, 8, 3)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1), labels_of)
  method = arl_jax.MLA(gate_batch=8)
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(1), method=method,
                                    modalities=names)
  ev = jax.jit(arl_jax.make_eval_step(user_model_apply, method=method))
  rng = np.random.default_rng(1)
  rows = 44                                       # 5 groups of 8, then 4
  x = {m: rng.normal(size=(rows, 5)).astype(np.float32) for m in names}
  y = rng.integers(0, 3, rows).astype(np.int32)

  def logits(batch_size):
    out = []
    for start in range(0, rows, batch_size):
      take = slice(start, start + batch_size)
      n = len(y[take])
      pad = lambda a, n=n: np.concatenate(
          [a, np.zeros((batch_size - n,) + a.shape[1:], a.dtype)])
      b = {"inputs": {m: pad(v[take]) for m, v in x.items()},
           "labels": pad(y[take]), "mask": np.arange(batch_size) < n}
      out.append(np.asarray(ev(state, b)["fused_logits"])[:n])
    return np.concatenate(out)

  first = logits(8)
  for size in (16, 24, 48, 64):
    np.testing.assert_array_equal(logits(size), first)
  # One gate per evaluation batch (gate_batch=0) changes with the size.
  whole = arl_jax.MLA(gate_batch=0)
  ev = jax.jit(arl_jax.make_eval_step(user_model_apply, method=whole))
  assert not np.allclose(logits(8), logits(48))
  with pytest.raises(ValueError, match="multiple of 8"):
    jax.jit(arl_jax.make_eval_step(user_model_apply, method=method))(
        state, {"inputs": {m: v[:12] for m, v in x.items()},
                "labels": y[:12]})


def test_gate_batch_and_fixed_weights_are_checked():
  with pytest.raises(ValueError, match="gate_batch must be"):
    arl_jax.MLA(gate_batch=-8)
  with pytest.raises(ValueError, match="fixed_weights must be"):
    arl_jax.MLA(gating="fixed", fixed_weights=(0.55, -0.45))
  with pytest.raises(ValueError, match="fixed_weights must be"):
    arl_jax.MLA(gating="fixed", fixed_weights=(float("nan"), 1.0))
  c = configs.override(uci.get_config(), {"method.name": "mla",
                                            "model.fusion": "shared",
                                            "eval_batch_size": 100})
  with pytest.raises(train.ConfigError, match="not a multiple of "
                     "method.gate_batch 64"):
    train.validate_config(c)
  assert mla_lib.grouped_batch_entropy_fusion is not None
