"""Seeds in one compiled program (``config.num_seeds``): each seed of a
multi-seed run equals the one-seed runner's run of that seed, for every
method at K = 2 and K = 3; and the multi-seed run keeps the runner's
guarantees (exact resume after SIGTERM and a stop, per-seed outputs, config
checks, several devices)."""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_runner import act_during_training
from test_runner import tiny_synthetic

import arl_jax
from experiments import train
from experiments import workdir as workdir_lib

SMALL = {"data.sizes": (256, 64, 64), "num_epochs": 2, "warmup_epochs": 1}
K3 = {"data.noise": {"audio": 1.0, "text": 1.8, "visual": 2.5}}
# Per method, what it needs of the run (the rest: its defaults).
NEEDS = {"g_blending": {"method.super_epoch": 1},
         "dr": {"method.every": 1, "method.run_epochs": 0},
         "mla": {"method.projection": "replace", "model.fusion": "shared"}}
# K = 3 in tests/test_seeds_k3.py (a module of its own: another test worker).
CASES = [(m, 2) for m in arl_jax.method_names()]


def _log(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines()]


def _state(workdir: pathlib.Path):
  mngr = ocp.CheckpointManager(workdir.absolute() / "checkpoints")
  step = mngr.latest_step()
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state


def _close(a, b, where=""):
  """Every number of two records within 1e-5 relative (None alike)."""
  if isinstance(a, dict):
    assert set(a) == set(b), where
    for k in a:
      _close(a[k], b[k], f"{where}/{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{where}[{i}]")
  elif isinstance(a, float) or isinstance(b, float):
    assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
  else:
    assert a == b, where


def _equal_to_one_seed_runs(tmp_path, overrides, seeds=(0, 1)):
  multi = tmp_path / "multi"
  report = train.train_and_evaluate(
      tiny_synthetic(**{**overrides, "num_seeds": len(seeds)}), multi)
  assert [r["seed"] for r in report["seeds"]] == list(seeds)
  stacked = _state(multi)
  for k, seed in enumerate(seeds):
    one = tmp_path / f"seed{seed}"
    alone = train.train_and_evaluate(
        tiny_synthetic(**{**overrides, "seed": seed}), one)
    mine = report["seeds"][k]
    assert mine["best_epoch"] == alone["best_epoch"]
    mine = {key: v for key, v in mine.items() if key != "parallel"}
    _close(mine, {key: v for key, v in alone.items() if key != "parallel"})
    _close(_log(multi / f"seed{seed}" / "metrics.jsonl"),
           _log(one / "metrics.jsonl"))
    saved = json.loads((multi / f"seed{seed}" / "results.json").read_text())
    assert saved["test_accuracy_at_best_val"] == report["seeds"][k][
        "test_accuracy_at_best_val"]
    pa = np.load(multi / f"seed{seed}" / "predictions.npz")
    pb = np.load(one / "predictions.npz")
    for key in pb.files:
      np.testing.assert_allclose(pa[key], pb[key], rtol=1e-5, atol=1e-6)
    want = _state(one)
    jax.tree.map(lambda a, b, k=k: np.testing.assert_allclose(
        np.asarray(a)[k], b, rtol=1e-5, atol=1e-6), stacked, want)
  return report


@pytest.mark.parametrize("method,k", CASES,
                         ids=[f"{m}-K{k}" for m, k in CASES])
def test_each_seed_equals_its_one_seed_run(method, k, tmp_path):
  check_method(method, k, tmp_path)


def check_method(method, k, tmp_path):
  overrides = {**SMALL, "method.name": method, **NEEDS.get(method, {}),
               **(K3 if k == 3 else {})}
  _equal_to_one_seed_runs(tmp_path, overrides)


@pytest.mark.parametrize("method", ["arl", "pmr"])
def test_the_sequential_program_equals_one_seed_runs(method, tmp_path):
  _equal_to_one_seed_runs(tmp_path, {**SMALL, "method.name": method,
                                     "seed_program": "map"})


def test_fusion_weighting_and_probes_per_seed(tmp_path):
  overrides = {**SMALL, "method.name": "arl", "data.heldout_fraction": 0.2,
               "diagnostics.linear_probe": True}
  report = _equal_to_one_seed_runs(tmp_path, overrides)
  for r in report["seeds"]:
    assert set(r["fusion"]) == {"inverse_variance", "inverse_error",
                                "calibrated"}
    assert "probe_accuracy_at_best_val" in r


def _reference(tmp_path_factory, **extra):
  workdir = tmp_path_factory.mktemp("reference") / "run"
  train.train_and_evaluate(tiny_synthetic(**{
      **SMALL, "num_epochs": 3, "num_seeds": 3, **extra}), workdir)
  return workdir


def _same_multi_run(a: pathlib.Path, b: pathlib.Path, seeds=(0, 1, 2)):
  for s in seeds:
    for name in ("metrics.jsonl", "results.json"):
      assert (a / f"seed{s}" / name).read_bytes() == (
          b / f"seed{s}" / name).read_bytes(), (s, name)
  jax.tree.map(np.testing.assert_array_equal, _state(a), _state(b))


def test_a_multi_seed_run_stops_and_resumes_exactly(tmp_path_factory):
  reference = _reference(tmp_path_factory, **{"method.name": "g_blending",
                                              "method.super_epoch": 1})
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  config = tiny_synthetic(**{**SMALL, "num_epochs": 3, "num_seeds": 3,
                             "method.name": "g_blending",
                             "method.super_epoch": 1})
  config.stop_after_epoch = 1
  out = train.train_and_evaluate(config, workdir)
  assert out["stopped_after_epoch"] == 1
  config.stop_after_epoch = 0
  train.train_and_evaluate(config, workdir)
  _same_multi_run(workdir, reference)


def test_sigterm_mid_epoch_saves_every_seed_and_resumes_exactly(
    tmp_path_factory, monkeypatch):
  reference = _reference(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("preempted") / "run"
  config = tiny_synthetic(**{**SMALL, "num_epochs": 3, "num_seeds": 3})
  load = act_during_training(
      monkeypatch, 2, 2, lambda: os.kill(os.getpid(), signal.SIGTERM), seed=2)
  with pytest.raises(workdir_lib.Preempted, match="batch 3 of 4 of epoch 2"):
    train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(train, "load_data", load)
  train.train_and_evaluate(config, workdir)
  _same_multi_run(workdir, reference)


def test_several_devices_shard_the_rows_of_every_seed(tmp_path):
  one = train.train_and_evaluate(tiny_synthetic(**{
      **SMALL, "num_seeds": 2}), tmp_path / "one")
  two = train.train_and_evaluate(tiny_synthetic(**{
      **SMALL, "num_seeds": 2, "parallel.devices": 2}), tmp_path / "two")
  for a, b in zip(one["seeds"], two["seeds"]):
    assert a["best_epoch"] == b["best_epoch"]
    assert a["test_accuracy_at_best_val"] == pytest.approx(
        b["test_accuracy_at_best_val"], abs=1 / 64)
    assert "2 seeds in one program" in b["parallel"]


def test_num_seeds_is_checked(tmp_path):
  with pytest.raises(train.ConfigError, match="num_seeds"):
    train.train_and_evaluate(tiny_synthetic(**{
        **SMALL, "num_seeds": 0}), tmp_path / "a")
  with pytest.raises(train.ConfigError, match="seed_program"):
    train.train_and_evaluate(tiny_synthetic(**{
        **SMALL, "num_seeds": 2, "seed_program": "loop"}), tmp_path / "c")
  with pytest.raises(train.ConfigError, match="parallel.mode='jit'"):
    train.train_and_evaluate(tiny_synthetic(**{
        **SMALL, "num_seeds": 2, "parallel.mode": "pmap"}), tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_comparison_runs_a_rows_seeds_as_one_program(tmp_path,
                                                         monkeypatch):
  from experiments import compare
  calls = []

  def fake(config, workdir):
    calls.append((config.seed, config.num_seeds, config.model.encoder,
                  pathlib.Path(workdir).relative_to(tmp_path).as_posix()))
    one = {"seed": config.seed, "test_accuracy_at_best_val": 0.5}
    if config.num_seeds > 1:
      return {"seeds": [dict(one, seed=config.seed + k)
                        for k in range(config.num_seeds)]}
    return one

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  rows = compare.runs("imbalance", True)
  dense = ("imbalance", "control", "concat", rows["control"]["concat"],
           [0, 1, 2], str(tmp_path))
  (key, reports, _) = compare._run_one(dense)
  assert calls == [(0, 3, "mlp", "control/concat")]
  assert sorted(reports) == [0, 1, 2]
  calls.clear()
  cnn = ("imbalance", "av_digits_cnn", "concat",
         rows["av_digits_cnn"]["concat"], [0, 1], str(tmp_path))
  compare._run_one(cnn)
  assert calls == [(0, 1, "cnn", "av_digits_cnn/concat/seed0"),
                   (1, 1, "cnn", "av_digits_cnn/concat/seed1")]
