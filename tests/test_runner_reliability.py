"""What must not silently corrupt a run: a second run in the workdir, damaged
checkpoints, a torn or missing metrics log, preemption, bad config values.

Each test damages or interrupts a real run of the runner (tiny synthetic
problem, 16 steps per epoch) and compares the outcome with an uninterrupted
run: byte for byte for metrics.jsonl and results.json, bitwise for the
final state.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_runner import tiny_synthetic

from experiments import train
from experiments import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
EPOCHS, STEPS = 3, 16          # 1024 training rows, batch 64
OVERRIDES = {"data.sizes": (1024, 256, 256), "num_epochs": EPOCHS}


def config(**extra):
  return tiny_synthetic(**{**OVERRIDES, **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  train.train_and_evaluate(config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """The same run stopped cleanly after epoch 2 (checkpoints 16 and 32)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  train.train_and_evaluate(config(stop_after_epoch=2), workdir)
  assert workdir_lib.saved_steps(workdir / "checkpoints") == [16, 32]
  return workdir


def final_state(workdir):
  mngr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints")
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  return step, restored.state


def assert_same_run(workdir, reference):
  """The outputs that are bit-identical between two runs of one config."""
  for name in ("metrics.jsonl", "results.json", "config.json"):
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), (
        name)
  za, zb = np.load(workdir / "predictions.npz"), np.load(
      reference / "predictions.npz")
  for key in zb.files:
    np.testing.assert_array_equal(za[key], zb[key])
  step_a, state_a = final_state(workdir)
  step_b, state_b = final_state(reference)
  assert step_a == step_b == EPOCHS * STEPS
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def strict_json_lines(path):
  def refuse(token):
    raise AssertionError(f"{path} holds the bare token {token}")
  return [json.loads(l, parse_constant=refuse)
          for l in path.read_text().splitlines()]


# ------------------------------------------------------------------- lock --

# A real run of the runner that stops (alive, holding the workdir) at the
# first batch of epoch 2 and says so by writing a file.
_HOLDER = """
import sys, time, pathlib
sys.path[:0] = [{root!r}, {tests!r}]
from test_runner_reliability import config
from experiments import train
load = train.load_data
def load_and_wait(config, workdir, **kwargs):
  data = load(config, workdir, **kwargs)
  epoch_batches = data.train
  def batches(epoch, first=0):
    for i, batch in enumerate(epoch_batches(epoch, first), first):
      if epoch == 2:
        pathlib.Path({ready!r}).write_text("holding")
        time.sleep(600)
      yield batch
  data.train = batches
  return data
train.load_data = load_and_wait
train.train_and_evaluate(config(), {workdir!r})
"""


def test_a_busy_workdir_is_refused_and_a_killed_holder_does_not_block(
    tmp_path, reference):
  workdir, ready = tmp_path / "run", tmp_path / "ready"
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER.format(
          root=str(ROOT), tests=str(TESTS), ready=str(ready),
          workdir=str(workdir))], cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    deadline = time.monotonic() + 240
    while not ready.exists():
      assert holder.poll() is None, "the holding run died"
      assert time.monotonic() < deadline
      time.sleep(0.05)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    # Another method in the same workdir (the case that used to write a
    # results.json labelled "concat" holding ARL's checkpoint): refused at
    # once, naming the holder; nothing in the workdir changes.
    start = time.monotonic()
    with pytest.raises(workdir_lib.WorkdirBusy,
                       match=rf"in use by another run \(pid {holder.pid} on "
                             r".+, started 20\d\d-"):
      train.train_and_evaluate(config(**{"method.name": "concat"}), workdir)
    assert time.monotonic() - start < 10
    # The same config too (this used to interleave two metrics logs).
    with pytest.raises(workdir_lib.WorkdirBusy):
      train.train_and_evaluate(config(), workdir)
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert before == after
  finally:
    holder.kill()
    holder.wait()
  # Killed (SIGKILL, no cleanup): its lock file is still there, its lock is
  # not, and the run resumes to the uninterrupted result.
  assert (workdir / ".lock").read_text()
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, reference)


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path / "w") as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
      workdir_lib.WorkdirLock(tmp_path / "w").acquire()
  workdir_lib.WorkdirLock(tmp_path / "w").acquire().release()


# ------------------------------------------------------------- checkpoints --

def _data_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip_16_bytes(step_dir):
  path = _data_file(step_dir)
  raw = bytearray(path.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
  path.write_bytes(bytes(raw))       # same size


def _truncate(step_dir):
  path = _data_file(step_dir)
  path.write_bytes(path.read_bytes()[:100])


def _delete_data(step_dir):
  _data_file(step_dir).unlink()


def _bad_metadata(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _unreadable_but_recorded(step_dir):
  # Damage that the checksum record agrees with (as if the save itself had
  # written garbage): orbax's own error sets the step aside.
  (step_dir / "meta" / "metadata").write_text("{not json")
  workdir_lib.write_checksums(step_dir)


@pytest.mark.parametrize("damage,reason", [
    (_flip_16_bytes, "does not match its saved SHA-256"),
    (_truncate, "bytes, .* were saved"),
    (_delete_data, "is missing"),
    (_bad_metadata, "meta/metadata has 9 bytes"),
    (_empty, "has no arl_checksums.json"),
    (_unreadable_but_recorded, "orbax cannot restore it"),
], ids=["16_bytes_changed", "truncated", "data_file_missing", "bad_metadata",
        "empty_step_dir", "recorded_but_unreadable"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    damage, reason, tmp_path, stopped, reference, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  damage(workdir / "checkpoints" / "32")
  train.train_and_evaluate(config(), workdir)
  err = capsys.readouterr().err
  assert "checkpoint step 32 skipped:" in err and "moved to" in err
  assert re.search(reason, err), err
  # Kept aside, not deleted; the run redid epoch 2 from step 16.
  assert (workdir / "damaged_checkpoints" / "32").is_dir()
  assert_same_run(workdir, reference)


def test_no_intact_checkpoint_starts_over_keeping_the_damaged(tmp_path, stopped,
                                                              reference,
                                                              capsys):
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  for step in ("16", "32"):
    _flip_16_bytes(workdir / "checkpoints" / step)
  train.train_and_evaluate(config(), workdir)
  err = capsys.readouterr().err
  assert "step 32 skipped" in err and "step 16 skipped" in err
  assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir()
                ) == ["16", "32"]
  assert_same_run(workdir, reference)


# ------------------------------------------------------------- metrics log --

@pytest.mark.parametrize("damage", ["torn_last_line", "deleted"])
def test_resuming_needs_no_metrics_log(damage, tmp_path, stopped, reference):
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  log = workdir / "metrics.jsonl"
  if damage == "deleted":
    log.unlink()
  else:                      # what a kill in the middle of a write leaves
    with open(log, "a") as f:
      f.write(log.read_text().splitlines()[-1][:300])
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, reference)
  strict_json_lines(log)


# -------------------------------------------------------------- preemption --

# The runner's CLI; the run signals itself in the middle of epoch 2 (batch
# 5): the moment is fixed by the training loop, not by this machine's speed.
_PREEMPTED = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
sys.argv = {argv!r}
from absl import app
from experiments import main, train
load = train.load_data
def load_and_signal(config, workdir, **kwargs):
  data = load(config, workdir, **kwargs)
  epoch_batches = data.train
  def batches(epoch, first=0):
    for i, batch in enumerate(epoch_batches(epoch, first), first):
      if epoch == 2 and i == 5:
        os.kill(os.getpid(), {signum})
      yield batch
  data.train = batches
  return data
if {during_save}:     # the signal arrives while checkpoint 16 is written
  train.load_data = load
  save = train._Checkpoints.save
  def save_and_signal(self, step, *args, **kwargs):
    if step == 16:
      os.kill(os.getpid(), {signum})
    return save(self, step, *args, **kwargs)
  train._Checkpoints.save = save_and_signal
else:
  train.load_data = load_and_signal
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("signum,during_save", [
    (signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT", "SIGINT_during_a_save"])
def test_preemption_saves_mid_epoch_and_resumes_exactly(signum, during_save,
                                                        tmp_path, reference):
  workdir = tmp_path / "run"
  argv = ["experiments.main", "--config", "experiments/configs/synthetic.py",
          "--workdir", str(workdir), "--config.data.sizes=(1024,256,256)",
          f"--config.num_epochs={EPOCHS}", "--config.warmup_epochs=1",
          "--config.optim.decay_epochs=(2,)", "--config.progress=none",
          "--config.parallel.devices=1"]
  proc = subprocess.run(
      [sys.executable, "-c", _PREEMPTED.format(
          root=str(ROOT), tests=str(TESTS), argv=argv, signum=int(signum),
          during_save=during_save)],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 128 + signum, proc.stderr
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  where = ("the end of epoch 1" if during_save else
           f"batch 6 of {STEPS} of epoch 2")
  assert last == (f"{signum.name}: saved at {where} in {workdir}; run the "
                  "same command again to resume exactly there."), proc.stderr
  # Saved at the step boundary after the signal (mid-epoch); a save the
  # signal interrupted finished first, and is the one kept.
  assert workdir_lib.saved_steps(workdir / "checkpoints") == (
      [16] if during_save else [16, 22])
  assert not (workdir / "results.json").exists()
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, reference)
  timings = strict_json_lines(workdir / "timings.jsonl")
  assert [t["resumed_at_batch"] for t in timings] == (
      [0, 0, 0] if during_save else [0, 6, 0])


# ------------------------------------------------------------------ config --

def test_divergence_stops_with_one_message_and_the_log_stays_json(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(train.TrainingDiverged,
                     match=r"diverged in epoch 1: the mean training loss is "
                           r"nan \(config.optim.learning_rate = 1000000.0\)"):
    train.train_and_evaluate(config(**{"optim.learning_rate": 1e6}), workdir)
  assert strict_json_lines(workdir / "metrics.jsonl") == []
  assert workdir_lib.json_line({"a": float("nan"), "b": [float("inf"), 1.0]}
                               ) == '{"a": null, "b": [null, 1.0]}\n'


def test_a_zero_statistic_gives_null_not_a_crash():
  record = train.epoch_record(
      1, {"loss": 1.0, "accuracy": 0.5, "unimodal_accuracy": {},
          "q": {"a": 1.0, "b": 0.0}, "s": {"a": 1.0, "b": 0.0},
          "a": {}, "scale": {}, "warmup": 0.0, "update_skipped": 0.0},
      {"accuracy": 0.5, "macro_f1": 0.5, "unimodal_accuracy": {}, "count": 2},
      {"accuracy": 0.5, "macro_f1": 0.5, "count": 2}, 0.1, ("a", "b"))
  assert workdir_lib.json_line(record).count('"dependency_ratio": {"a": null}')
