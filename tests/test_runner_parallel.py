"""The runner on several devices and processes (faked CPU devices)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from arl_jax import data as data_lib
from benchmarks import fake_data
from experiments import configs
from experiments import train
from experiments import workdir as workdir_lib
from experiments.configs import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {"data.sizes": (512, 128, 256), "num_epochs": 3,
             "optim.decay_epochs": (2,), "warmup_epochs": 1}
# Float32 sums over 8 shards are added in another order than over one: the
# per-epoch losses, coefficients and statistics agree to this relative
# tolerance, accuracies to one row of the split.
RTOL = 2e-4


def _config(**overrides):
  c = synthetic.get_config()
  c.progress, c.plots = "none", False
  return configs.override(c, {**OVERRIDES, **overrides})


def _history(workdir):
  return [json.loads(l) for l in
          (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_runs_agree(a, b, rows=(128, 256)):
  ha, hb = _history(a), _history(b)
  assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
  for x, y in zip(ha, hb):
    for key in ("train_loss", "train_accuracy"):
      np.testing.assert_allclose(x[key], y[key], rtol=RTOL)
    for key in ("a", "q", "s", "scale"):
      for m in x[key]:
        np.testing.assert_allclose(x[key][m], y[key][m], rtol=RTOL, atol=1e-6)
    assert abs(x["val_accuracy"] - y["val_accuracy"]) <= 1 / rows[0] + 1e-9
    assert abs(x["test_accuracy"] - y["test_accuracy"]) <= 1 / rows[1] + 1e-9
  ra = json.loads((pathlib.Path(a) / "results.json").read_text())
  rb = json.loads((pathlib.Path(b) / "results.json").read_text())
  assert ra["best_epoch"] == rb["best_epoch"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one") / "run"
  report = train.train_and_evaluate(_config(**{"parallel.devices": 1}),
                                    workdir)
  assert report["parallel"] == "jit over 1 cpu device(s), 1 process(es)"
  return workdir


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_runner_on_8_devices_reproduces_one_device(mode, one_device, tmp_path):
  report = train.train_and_evaluate(
      _config(**{"parallel.mode": mode, "parallel.devices": 0}),
      tmp_path / "run")
  assert report["parallel"] == f"{mode} over 8 cpu device(s), 1 process(es)"
  assert_runs_agree(tmp_path / "run", one_device)
  # Evaluation counted every row of each split exactly once.
  assert report["test_accuracy_last"] * 256 == pytest.approx(
      round(report["test_accuracy_last"] * 256))


def test_batch_that_does_not_divide_is_refused(tmp_path):
  with pytest.raises(train.ConfigError, match="config.batch_size 60 is not "
                     "divisible by the 8 devices"):
    train.train_and_evaluate(_config(batch_size=60), tmp_path / "run")
  with pytest.raises(train.ConfigError, match="mode must be one of"):
    train.train_and_evaluate(_config(**{"parallel.mode": "shard"}),
                             tmp_path / "run")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------- processes --

def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Run as one process of the CLI, signalling itself in the middle of epoch 3
# (after checkpoint 2). SIGKILL: the other process is then stuck in a
# collective and the launcher stops it, as a scheduler would. SIGTERM (a
# preemption notice to one host): JAX's preemption service tells every
# process, and all of them save at the same step and stop.
_KILLED = """
import os, signal, sys, time
sys.argv = {argv!r}
from absl import app
from experiments import main, train
load = train.load_data
def load_and_die(config, workdir, **kwargs):
  data = load(config, workdir, **kwargs)
  epoch_batches = data.train
  def batches(epoch, first=0):
    for i, batch in enumerate(epoch_batches(epoch, first), first):
      if epoch == 3 and i == 2:
        os.kill(os.getpid(), signal.{signal})
      if epoch * 100 + i > 302:   # slower steps: JAX's service agrees soon
        time.sleep(0.3)
      yield batch
  data.train = batches
  return data
train.load_data = load_and_die
app.run(main.main, flags_parser=main.parse_flags)
"""


def _launch(workdir, processes, extra=(), timeout=300, devices=4,
            num_processes=None, config="experiments/configs/synthetic.py",
            overrides=OVERRIDES, kill_process=None, send="SIGKILL"):
  """The runner's own CLI once per process on loopback; all or nothing (a
  process that fails has the others stopped; a preempted one, exit status
  128 + SIGTERM, lets the others save and stop too)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0"}
  port = _port()
  flags = [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]
  procs = []
  for i in range(processes):
    argv = ["experiments.main", "--config", config, "--workdir", str(workdir),
            "--config.progress=none", "--config.plots=False", *flags, *extra,
            "--coordinator", f"127.0.0.1:{port}", "--num_processes",
            str(num_processes or processes), "--process_id", str(i)]
    cmd = ([sys.executable, "-c", _KILLED.format(argv=argv, signal=send)]
           if i == kill_process else [sys.executable, "-m", *argv])
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0, 128 + signal.SIGTERM) for p in procs):
        break
      assert time.monotonic() < deadline, "multi-process run timed out"
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.wait(), p.stdout.read()) for p in procs]


def test_two_processes_of_four_devices_preempt_stop_resume_and_agree(
    one_device, tmp_path):
  workdir = tmp_path / "run"
  four = {**OVERRIDES, "num_epochs": 4}
  # 1. Process 1 gets SIGTERM in epoch 3 (checkpoint 16, after epoch 2, is on
  # disk): both processes save at one step boundary and stop, each with the
  # one-line message.
  out = _launch(workdir, 2, kill_process=1, overrides=four, send="SIGTERM")
  assert [code for code, _ in out] == [128 + signal.SIGTERM] * 2, out
  # The step is the one JAX's service agrees on once the notice reached
  # every process (a few steps later, mid-epoch or at an epoch's end).
  saved = workdir_lib.saved_steps(workdir / "checkpoints")
  step = saved[-1]
  epoch, batch = (step - 1) // 8 + 1, (step - 1) % 8 + 1
  assert 19 <= step <= 31, saved
  assert saved[:-1] == ([8 * (epoch - 1)] if batch < 8 else [step - 8])
  where = (f"batch {batch} of 8 of epoch {epoch}" if batch < 8 else
           f"the end of epoch {epoch}")
  for _, text in out:
    assert (f"SIGTERM: saved at {where} in {workdir}; run the same command "
            "again") in text, text
    assert "Traceback" not in text
  assert not (workdir / "results.json").exists()
  # 2. Resumed mid-epoch, it stops cleanly after epoch 3
  # (--config.stop_after_epoch).
  out = _launch(workdir, 2, ["--config.stop_after_epoch=3"], overrides=four)
  assert all(code == 0 for code, _ in out), out
  # 3. Resumed again, it finishes; one process writes the results.
  out = _launch(workdir, 2, overrides=four)
  assert all(code == 0 for code, _ in out), out
  assert "jit over 8 cpu device(s), 2 process(es)" in out[0][1]
  assert "results:" not in out[1][1]
  history = _history(workdir)
  assert [h["epoch"] for h in history] == [1, 2, 3, 4]
  assert all(h["test_count"] == 256 and h["val_count"] == 128
             for h in history)
  # The first three epochs against an uninterrupted 1-device run (4 epochs
  # here, 3 there: the same computation up to epoch 3).
  ref = _history(one_device)
  for x, y in zip(history[:3], ref):
    np.testing.assert_allclose(x["train_loss"], y["train_loss"], rtol=RTOL)
    for m in x["a"]:
      np.testing.assert_allclose(x["a"][m], y["a"][m], rtol=RTOL, atol=1e-6)


def test_audio_visual_runner_in_two_processes(tmp_path):
  """Each process reads its shard; evaluation counts every clip once."""
  root = fake_data.write_fake_crema_d(tmp_path / "raw", actors=(1001, 1002),
                                     sentences=("DFA",), frames=1, seconds=0.5,
                                     test_fraction=0.35)
  prepared = tmp_path / "prepared"
  split = data_lib.load_prepared(
      data_lib.prepare("crema_d", root, prepared).data_dir)
  out = _launch(tmp_path / "run", 2, config="experiments/configs/crema_d.py",
                devices=1, overrides={
                    "data.path": str(root), "data.prepared_dir": str(prepared),
                    "data.image_size": 32, "data.augment": "device",
                    "batch_size": 4, "eval_batch_size": 8, "num_epochs": 1,
                    "warmup_epochs": 0})
  assert all(code == 0 for code, _ in out), out
  (h,) = _history(tmp_path / "run")
  assert h["test_count"] == len(split["test"])
  assert h["val_count"] == len(split["validation"])
  assert np.isfinite(h["train_loss"]) and set(h["a"]) == {"audio", "visual"}
  report = json.loads((tmp_path / "run" / "results.json").read_text())
  assert report["augment"] == "device" and report["best_epoch"] == 1


def test_a_process_count_nobody_else_has_fails_fast(tmp_path):
  start = time.monotonic()
  out = _launch(tmp_path / "run", 1, ["--init_timeout=5"], num_processes=2,
                timeout=120)
  code, text = out[0]
  assert code != 0 and "could not join the coordinator" in text, text
  assert time.monotonic() - start < 90
  assert not (tmp_path / "run").exists()


def test_audio_visual_shards_are_disjoint_and_cover_the_split(tmp_path,
                                                              monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  root = fake_data.write_fake_crema_d(tmp_path / "raw", actors=(1001, 1002),
                                     sentences=("DFA",), frames=1, seconds=0.5,
                                     test_fraction=0.35)
  builder = data_lib.prepare("crema_d", root, tmp_path / "prepared")
  split = data_lib.load_prepared(builder.data_dir)["train"]
  kw = dict(batch_size=8, num_frames=1, image_size=32)
  for train_mode in (False, True):
    whole = list(data_lib.av_batches(split, train=train_mode, **kw))
    shards = [list(data_lib.av_batches(split, train=train_mode,
                                       shard_index=i, shard_count=2, **kw))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    seen = []
    for b, s0, s1 in zip(whole, *shards):
      # Process i holds rows [4 i, 4 i + 4) of each global batch (padding
      # rows, mask False, may hold anything).
      mask = np.concatenate([s0["mask"], s1["mask"]])
      np.testing.assert_array_equal(mask, b["mask"])
      np.testing.assert_array_equal(
          np.concatenate([s0["labels"], s1["labels"]])[mask],
          b["labels"][mask])
      np.testing.assert_array_equal(np.concatenate(
          [s0["inputs"]["audio"], s1["inputs"]["audio"]])[mask],
          b["inputs"]["audio"][mask])
      for s in (s0, s1):
        seen += [a.tobytes() for a in s["inputs"]["audio"][s["mask"]]]
    assert len(seen) == len(set(seen))             # disjoint
    expect = len(split) if not train_mode else (len(split) // 8) * 8
    assert len(seen) == expect                     # cover (train: full batches)
