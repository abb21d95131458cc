"""The epoch-hook methods (PMR, D&R, G-Blending) on an audio-visual source.

One tiny CREMA-D-layout data set, prepared once for the module; each method
trains two short epochs through the runner: the audio-visual pipeline, its
device augmentation and padded evaluation batches as in a real run, with two
small encoders in place of the ResNet18s (compiling those for every method
and G-Blending's copies would take minutes on a CPU).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arl_jax
from arl_jax import data as data_lib
from arl_jax import models
from arl_jax.epoch_hooks import batch_features
from benchmarks import fake_data
from experiments import configs
from experiments import train
from experiments.configs import ave
from experiments.configs import crema_d
from experiments.configs import kinetics_sounds
from experiments.configs import synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("av")
  root = fake_data.write_fake_crema_d(tmp / "raw", actors=(1001, 1002),
                                     sentences=("DFA",), frames=1, seconds=0.5,
                                     test_fraction=0.35)
  builder = data_lib.prepare("crema_d", root, tmp / "prepared")
  return root, tmp / "prepared", data_lib.load_prepared(builder.data_dir)


class _TinyEncoder(nn.Module):
  """Flattened input (uint8 frames scaled to [0, 1]), Dense and BatchNorm."""

  @nn.compact
  def __call__(self, x, train=False):
    scale = 1 / 255 if x.dtype == jnp.uint8 else 1.0
    x = x.astype(jnp.float32).reshape(x.shape[0], -1) * scale
    x = nn.Dense(8)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


def _tiny_model(config, data):
  return models.MultimodalClassifier(
      encoders={"audio": _TinyEncoder(), "visual": _TinyEncoder()},
      head=models.make_fusion(config.model.fusion, data.num_classes,
                              ("audio", "visual")))


@pytest.fixture
def tiny_model(monkeypatch):
  monkeypatch.setattr(train, "build_model", _tiny_model)


def _config(prepared, **overrides):
  root, prepared_dir, _ = prepared
  c = crema_d.get_config()
  c.progress, c.plots = "none", False
  c.parallel.devices = 1
  return configs.override(c, {
      "data.path": str(root), "data.prepared_dir": str(prepared_dir),
      "data.image_size": 32, "batch_size": 2, "eval_batch_size": 3,
      "num_epochs": 2, "warmup_epochs": 0, "optim.decay_epochs": (2,),
      **overrides})


def _history(workdir):
  return [json.loads(l) for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def _check_finite(history, report):
  assert [h["epoch"] for h in history] == [1, 2]
  for h in history:
    for key in ("train_loss", "val_accuracy", "test_accuracy"):
      assert np.isfinite(h[key]), (key, h[key])
  assert np.isfinite(report["test_accuracy_last"])
  assert all(np.isfinite(v) for v in report["encoder_distance"].values())


# Method fields the runner sets from the data, not the config.
RUNNER_SET = {"batches_per_epoch"}


def test_av_configs_accept_every_method_and_its_fields(tmp_path):
  for cfg in (crema_d, kinetics_sounds, ave):
    for name in arl_jax.method_names():
      c = cfg.get_config()
      c.data.path = str(tmp_path)
      c.method.name = name
      fields = {f.name for f in dataclasses.fields(
          arl_jax.methods.method_class(name))} - RUNNER_SET
      assert fields <= set(c.method.keys()), (name, fields - set(c.method))
      if arl_jax.make_method(name).needs_heldout:
        continue          # held-out rows: in-memory sources only
      train.validate_config(c)
  c = configs.override(crema_d.get_config(), {
      "data.path": str(tmp_path), "method.name": "pmr", "method.mu": 0.5,
      "method.fraction": 0.3, "method.alpha": 2.0})
  train.validate_config(c)
  assert train.make_method(c) == arl_jax.PMR(alpha=2.0, mu=0.5, fraction=0.3)


@pytest.mark.parametrize("name", ["pmr", "dr", "g_blending"])
def test_several_processes_are_refused_for_audio_visual_data_only(
    name, tmp_path, monkeypatch):
  av = configs.override(crema_d.get_config(), {
      "data.path": str(tmp_path), "method.name": name})
  in_memory = configs.override(synthetic.get_config(), {"method.name": name})
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  with pytest.raises(train.ConfigError, match=f"method '{name}' reads .* "
                     "audio-visual source that runs in one process only"):
    train.validate_config(av)
  train.validate_config(in_memory)       # every process holds every row


def test_features_of_a_split_read_every_row_once_in_evaluation_mode(prepared):
  _, _, src = prepared
  c = _config(prepared, **{"data.augment": "device"})
  data = train.load_data(c, None)
  assert data.eval_preprocess is not None
  seen = []

  def feature_fn(state, inputs):
    del state
    seen.append(inputs["visual"].shape)
    return {m: np.asarray(v, np.float32).reshape(len(v), -1)[:, :4]
            for m, v in inputs.items()}

  preprocess = jax.jit(data.eval_preprocess)

  def split_features(split):
    # What the runner's epoch hook reads (arl_jax.epoch_hooks.EpochHook).
    return batch_features(feature_fn, None, train._feature_batches(
        data, split), preprocess=preprocess)

  for split in ("train", "validation"):
    x, y = split_features(split)
    want = np.array([src[split][i]["label"] for i in range(len(src[split]))])
    np.testing.assert_array_equal(y, want)      # every row once, in order
    assert {m: len(v) for m, v in x.items()} == {"audio": len(want),
                                                  "visual": len(want)}
  # The frames the features saw were resized on the device (no canvas).
  assert all(s[2:4] == (32, 32) for s in seen)
  first, _ = split_features("train")
  again, _ = split_features("train")
  for m in first:                              # no augmentation: the same
    np.testing.assert_array_equal(again[m], first[m])


@pytest.mark.parametrize("name,overrides", [
    ("pmr", {"data.augment": "device"}),
    ("dr", {"method.every": 1, "method.times": 1, "method.run_epochs": 0}),
    ("g_blending", {"method.super_epoch": 1, "data.augment": "device"}),
])
def test_epoch_hook_methods_train_on_audio_visual_data(name, overrides,
                                                      prepared, tiny_model,
                                                      tmp_path):
  _, _, src = prepared
  c = _config(prepared, **{"method.name": name, **overrides})
  report = train.train_and_evaluate(c, tmp_path / name)
  history = _history(tmp_path / name)
  _check_finite(history, report)
  # D&R fires after the official 0-based epoch 1 (the runner's epoch 2).
  hook = history[1 if name == "dr" else 0]["method"]
  if name == "pmr":
    rows = len(src["train"])
    assert hook["prototypes_from_rows"] == max(1, round(0.1 * rows))
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert "method" in history[1]
  elif name == "dr":
    assert set(hook["reinit"]) == {"audio", "visual"}
    for v in hook["reinit"].values():
      assert 0.0 <= v["weight"] < 1.0
      assert 0.0 < v["purity_train"] <= 1.0
      assert 0.0 < v["purity_validation"] <= 1.0
    assert "method" not in history[0]
  else:
    # Estimated after every epoch but the last (no step would use it).
    assert "method" not in history[-1]
    for h in history[:-1]:
      weights = h["method"]["weights"]
      assert set(weights) == {"fused", "audio", "visual"}
      assert sum(weights.values()) == pytest.approx(1.0)
      assert all(np.isfinite(v) for c in h["method"]["curves"].values()
                 for v in c)
