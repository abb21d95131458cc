"""D&R: purity, the re-initialisation weight and the interpolation, against
hand computations (float64), its schedule, and the runner's epoch hook."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_runner import tiny_synthetic

import arl_jax
from arl_jax.methods import diagnose_relearn as dr
from experiments import train


def test_purity_min_max_scale_and_kmeans():
  assign = np.array([0, 0, 0, 1, 1, 2])
  labels = np.array([1, 1, 2, 0, 0, 2])
  assert dr.purity(assign, labels) == pytest.approx((2 + 2 + 1) / 6)
  x = np.array([[0.0, 5.0], [2.0, 5.0], [1.0, 5.0]])
  np.testing.assert_allclose(dr.min_max_scale(x),
                             [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
  # Three far-apart blobs are found whatever their order.
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  blob = np.repeat(np.arange(3), 20)
  x = centres[blob] + 0.1 * rng.normal(size=(60, 2))
  assert dr.purity(dr.kmeans(x, 3, seed=0), blob) == 1.0
  assert dr.reinit_weight(1.0, 0.75, 3.0) == pytest.approx(np.tanh(0.75))


def _blobs(labels, cluster_of_row, seed):
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
  return centres[cluster_of_row] + 0.05 * rng.normal(size=(len(labels), 2))


def _state(names):
  rng = np.random.default_rng(1)
  params = {m: {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=2), jnp.float32)}
            for m in names}
  params["head"] = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  method = arl_jax.DiagnoseRelearn(every=2, times=2, run_epochs=0)
  tx = arl_jax.with_modality_scales(optax.sgd(0.1),
                                    arl_jax.label_modalities(names))
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    rng=jax.random.PRNGKey(0), method=method,
                                    modalities=names)
  return method, state


def test_epoch_hook_interpolates_towards_the_initial_encoders():
  names = ("audio", "visual")
  method, state = _state(names)
  initial = jax.device_get(state.params)
  # Training moved every parameter.
  state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  y = np.repeat(np.arange(3), 20)
  # audio: clusters follow the labels in both splits (gap 0, w = 0);
  # visual: in validation a third of each class sits in another cluster
  # (purity 2/3 there, 1 in train: gap 1/3, w = tanh(1)).
  shifted = y.copy()
  shifted[::3] = (y[::3] + 1) % 3
  feats = {"train": ({"audio": _blobs(y, y, 0), "visual": _blobs(y, y, 1)}, y),
           "validation": ({"audio": _blobs(y, y, 2),
                           "visual": _blobs(y, shifted, 3)}, y)}
  context = arl_jax.EpochContext(modalities=names, num_classes=3,
                                 features=feats.__getitem__, seed=0)
  new, record = method.epoch_end(3, state, context)
  w = {"audio": 0.0, "visual": np.tanh(3.0 * (1.0 - 2.0 / 3.0))}
  assert record["reinit"]["visual"]["purity_validation"] == pytest.approx(2 / 3)
  for m in names:
    assert record["reinit"][m]["weight"] == pytest.approx(w[m], abs=1e-12)
    for k in ("w", "b"):
      want = (w[m] * np.asarray(initial[m][k], np.float64)
              + (1 - w[m]) * (np.asarray(initial[m][k], np.float64) + 1.0))
      np.testing.assert_allclose(new.params[m][k], want, rtol=1e-6)
  # The head and the optimiser state are untouched.
  np.testing.assert_array_equal(new.params["head"]["w"], state.params["head"]["w"])
  assert int(new.method_state["count"]) == 1


def test_schedule_every_and_at_most_times():
  names = ("audio", "visual")
  method, state = _state(names)
  y = np.repeat(np.arange(3), 20)
  calls = []
  def features(split):
    calls.append(split)
    return {m: _blobs(y, y, len(calls)) for m in names}, y
  context = arl_jax.EpochContext(modalities=names, num_classes=3,
                                 features=features)
  counts = []
  for epoch in range(1, 8):
    state, record = method.epoch_end(epoch, state, context)
    counts.append((epoch, int(state.method_state["count"]), bool(record)))
  # every=2, times=2: after the official loop's epochs 2 and 4 (0-based),
  # the runner's 3 and 5, only.
  assert [c for c in counts if c[2]] == [(3, 1, True), (5, 2, True)]
  assert calls.count("test") == 0 and calls.count("validation") == 2


def test_runner_reinitialises_and_records_it(tmp_path):
  c = tiny_synthetic(epochs=2, **{"method.name": "dr", "method.every": 1,
                                  "method.times": 1, "method.run_epochs": 0})
  train.train_and_evaluate(c, tmp_path / "dr")
  history = [json.loads(l) for l in
             (tmp_path / "dr" / "metrics.jsonl").read_text().splitlines()]
  # every=1: after the official 0-based epoch 1, the runner's epoch 2.
  assert "method" not in history[0]
  info = history[1]["method"]["reinit"]
  assert set(info) == {"audio", "visual"}
  assert all(0.0 <= v["weight"] < 1.0 for v in info.values())


def test_audio_visual_sources_in_several_processes_are_refused(tmp_path,
                                                              monkeypatch):
  # One process: accepted (tests/test_runner_av_methods.py trains it).
  c = tiny_synthetic(**{"method.name": "dr"})
  c.data.source, c.data.path = "crema_d", str(tmp_path)
  train.validate_config(c)
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  with pytest.raises(train.ConfigError, match="runs in one process only"):
    train.validate_config(c)
