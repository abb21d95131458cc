"""Runner reliability, second round (issue 26): each case damages or misuses
a real run and checks what the user sees, against an uninterrupted run
(byte for byte for the logs and results, bitwise for the state)."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_runner_reliability
from test_runner import act_during_training
from test_runner_reliability import _flip_16_bytes
from test_runner_reliability import _unreadable_but_recorded
from test_runner_reliability import assert_same_run
from test_runner_reliability import config

from arl_jax import data as data_lib
from arl_jax.data import layouts
from experiments import train
from experiments import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The uninterrupted run and the run stopped after epoch 2 (checkpoints 16,
# 32): the fixtures of test_runner_reliability.py, built again here.
reference = test_runner_reliability.reference
stopped = test_runner_reliability.stopped


def _copy(src, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  return workdir


# ------------------------------------------------------------- checkpoints --

def test_a_fallback_checkpoint_is_verified_before_it_is_restored(
    tmp_path, stopped, reference, capsys):
  # The newest step verifies but orbax cannot read it; the previous one has
  # bits flipped behind a stale checksum: both are set aside, and the run
  # starts over instead of restoring damaged weights.
  workdir = _copy(stopped, tmp_path)
  _unreadable_but_recorded(workdir / "checkpoints" / "32")
  _flip_16_bytes(workdir / "checkpoints" / "16")
  train.train_and_evaluate(config(), workdir)
  err = capsys.readouterr().err
  assert "step 32 skipped: orbax cannot restore it" in err
  assert "step 16 skipped:" in err and "SHA-256" in err
  assert_same_run(workdir, reference)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_finished_runs_predictions_are_restored(damage, tmp_path, reference,
                                                  capsys):
  workdir = _copy(reference, tmp_path)
  path = workdir / "predictions.npz"
  if damage == "deleted":
    path.unlink()
  else:
    path.write_bytes(path.read_bytes()[:200])
  train.train_and_evaluate(config(), workdir)
  assert "predictions.npz" in capsys.readouterr().err
  assert_same_run(workdir, reference)


def test_predictions_deleted_mid_run_after_the_best_epoch(tmp_path, stopped,
                                                          reference):
  workdir = _copy(stopped, tmp_path)
  (workdir / "predictions.npz").unlink()
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, reference)


def test_disk_full_while_saving_is_one_line_and_keeps_the_checkpoint(
    tmp_path, stopped, monkeypatch):
  workdir = _copy(stopped, tmp_path)

  def full(self, *args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, "No space left on device",
                    str(workdir / "checkpoints" / "48"))
    except OSError as e:
      raise RuntimeError("orbax: save failed") from e

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(config(), workdir)
  message = str(info.value)
  assert "No space left on device" in message and "disk is full" in message
  assert "MB" in message and "\n" not in message
  assert workdir_lib.saved_steps(workdir / "checkpoints") == [16, 32]
  assert workdir_lib.verify(workdir / "checkpoints" / "32") is None


# ----------------------------------------------------------------- workdir --

def test_a_foreign_non_empty_workdir_is_refused_untouched(tmp_path):
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("my own metrics\n")
  (workdir / "notes.txt").write_text("notes")
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  with pytest.raises(train.ConfigError, match="holds no arl_jax run"):
    train.train_and_evaluate(config(), workdir)
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_a_replaced_lock_stops_the_run_before_it_writes(tmp_path,
                                                        monkeypatch):
  workdir = tmp_path / "run"

  def steal():                          # another run takes the workdir
    (workdir / ".lock").unlink()
    (workdir / ".lock").write_text("{}")
  act_during_training(monkeypatch, 2, 3, steal)
  with pytest.raises(workdir_lib.WorkdirBusy, match="deleted or replaced"):
    train.train_and_evaluate(config(), workdir)
  history = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in history] == [1]
  assert workdir_lib.saved_steps(workdir / "checkpoints") == [16]


def test_the_lock_check_sees_deletion_and_replacement(tmp_path):
  lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  lock.check_held()
  os.unlink(tmp_path / ".lock")
  with pytest.raises(workdir_lib.WorkdirBusy):
    lock.check_held()
  (tmp_path / ".lock").write_text("")
  with pytest.raises(workdir_lib.WorkdirBusy):
    lock.check_held()
  lock.release()


@pytest.mark.parametrize("case", ["workdir_is_a_file", "below_a_file",
                                  "lock_is_a_folder"])
def test_file_system_misuse_is_one_line(case, tmp_path):
  target = tmp_path / "run"
  if case == "workdir_is_a_file":
    target.write_text("x")
  elif case == "below_a_file":
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run"
  else:
    (target / ".lock").mkdir(parents=True)
  with pytest.raises(workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(config(), target)
  assert "\n" not in str(info.value) and str(target.name) in str(info.value)


def test_a_damaged_record_is_refused_or_ignored_in_one_line(tmp_path, stopped,
                                                            reference):
  workdir = _copy(stopped, tmp_path)
  (workdir / "config.json").write_text("{not json")
  with pytest.raises(train.ConfigError, match="is not JSON"):
    train.train_and_evaluate(config(), workdir)
  # Garbage in a log (not the run's record) is dropped, the run resumes.
  workdir = _copy(stopped, tmp_path / "b")
  (workdir / "timings.jsonl").write_bytes(b"\xff\xfe\x00garbage\n{]\n")
  train.train_and_evaluate(config(), workdir)
  assert_same_run(workdir, reference)
  # A folder where the run keeps its log: one line naming it.
  workdir = _copy(stopped, tmp_path / "c")
  (workdir / "metrics.jsonl").unlink()
  (workdir / "metrics.jsonl").mkdir()
  with pytest.raises(workdir_lib.WorkdirError, match="metrics.jsonl"):
    train.train_and_evaluate(config(), workdir)


@pytest.mark.parametrize("code,advice", [
    (errno.EROFS, "read-only"), (errno.EACCES, "no permission"),
    (errno.ENOSPC, "disk is full"), (errno.ENOTDIR, "is a file")])
def test_os_errors_are_described_with_what_to_do(code, advice):
  e = OSError(code, os.strerror(code), "/runs/a/checkpoints/16")
  wrapped = RuntimeError("wrapper")
  wrapped.__cause__ = e
  assert workdir_lib.os_error_in(wrapped) is e
  line = workdir_lib.describe_os_error(e, "saving")
  assert "/runs/a/checkpoints/16" in line and advice in line
  assert "\n" not in line


def test_the_cli_prints_one_line_and_debug_the_traceback(tmp_path):
  (tmp_path / "file").write_text("x")
  argv = [sys.executable, "-m", "experiments.main", "--config",
          str(ROOT / "experiments/configs/synthetic.py"),
          f"--workdir={tmp_path / 'file' / 'run'}"]
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
  debug = subprocess.run(argv + ["--debug"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_sigterm_during_start_up_says_so(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.main", "--config",
       str(ROOT / "experiments/configs/synthetic.py"),
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, stderr=subprocess.PIPE,
      text=True)
  time.sleep(1.5)                     # importing, before any training
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "SIGTERM during start-up" in err
  assert len(err.strip().splitlines()) == 1, err


def test_a_second_signal_during_a_save_waits_for_it():
  preempt = workdir_lib.Preemption(())
  preempt._handle(signal.SIGINT, None)
  with preempt.saving():
    preempt._handle(signal.SIGINT, None)     # no KeyboardInterrupt here
  with pytest.raises(KeyboardInterrupt):
    preempt._handle(signal.SIGINT, None)     # outside a save: abort


# ------------------------------------------------------------------ config --

@pytest.mark.parametrize("overrides,match", [
    ({"method.name": "arl", "method.reference": "bogus"}, "reference"),
    ({"method.name": "mla", "method.projection": "replace",
      "model.fusion": "concat"}, "fusion='shared'"),
    ({"method.name": "arl", "method.entropy_floor": -1.0}, "entropy_floor"),
    ({"method.name": "arl", "method.entropy_floor": float("nan")},
     "entropy_floor"),
    ({"method.name": "agm", "method.clamp": -1.0}, "clamp"),
    ({"method.name": "mla", "method.fixed_weights": (-1.0, 2.0),
      "method.gating": "fixed"}, "fixed_weights"),
    ({"method.name": "arl", "method.temperature": float("inf")},
     "temperature"),
    ({"method.name": "arl", "method.gamma": float("inf")}, "gamma"),
    ({"method.name": "ogm_ge", "method.alpha": float("nan")}, "alpha"),
    ({"stop_after_epoch": 1, "checkpoint_every_epochs": 2}, "multiple"),
])
def test_bad_values_are_refused_before_anything_is_written(overrides, match,
                                                           tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(config(**overrides), workdir)
  assert not workdir.exists()


def test_an_error_where_the_step_is_built_leaves_no_config(tmp_path,
                                                           monkeypatch):
  workdir = tmp_path / "run"
  real = train.arl_jax.make_train_step

  def refuse(*args, **kwargs):
    raise ValueError("this model cannot serve that option")

  monkeypatch.setattr(train.arl_jax, "make_train_step", refuse)
  with pytest.raises(train.ConfigError, match="cannot serve that option"):
    train.train_and_evaluate(config(), workdir)
  assert not (workdir / "config.json").exists()
  monkeypatch.setattr(train.arl_jax, "make_train_step", real)
  train.train_and_evaluate(config(num_epochs=1), workdir)   # corrected: runs


# -------------------------------------------------------------------- data --

def _rows(*clips):
  return [layouts.Clip(c, "NEU", pathlib.Path(c), pathlib.Path(c),
                       listed=f"{s}.csv, line {i}")
          for i, (c, s) in enumerate(clips, 1)]


def test_clip_lists_refuse_leaks_duplicates_empty_and_non_utf8(tmp_path):
  with pytest.raises(data_lib.DataError, match="leak"):
    layouts.check_clip_lists({"train": _rows(("a", "train")),
                              "test": _rows(("a", "test"))})
  with pytest.raises(data_lib.DataError, match="listed twice"):
    layouts.check_clip_lists({"train": _rows(("a", "train"), ("a", "train"))})
  empty = tmp_path / "train.csv"
  empty.write_text("\n\n")
  with pytest.raises(data_lib.DataError, match="lists no clip"):
    layouts.read_list(empty)
  latin = tmp_path / "test.csv"
  latin.write_bytes("clip_\xe9,NEU\n".encode("latin-1"))
  with pytest.raises(data_lib.DataError, match="not UTF-8"):
    layouts.read_list(latin)


def _crema(tmp_path):
  from benchmarks import fake_data
  return fake_data.write_fake_crema_d(tmp_path / "raw", actors=(1001, 1002),
                                      sentences=("DFA",))


def test_a_leak_between_lists_stops_preparation(tmp_path):
  raw = _crema(tmp_path)
  first_test = (raw / "test.csv").read_text().splitlines()[0]
  with open(raw / "train.csv", "a") as f:
    f.write(first_test + "\n")
  with pytest.raises(data_lib.DataError, match="leak"):
    data_lib.prepare("crema_d", raw, tmp_path / "prepared")


def test_prepared_data_are_tied_to_what_they_were_prepared_from(tmp_path):
  raw = _crema(tmp_path)
  data_lib.prepare("crema_d", raw, tmp_path / "prepared")
  data_lib.prepare("crema_d", raw, tmp_path / "prepared")     # same: reused
  lines = (raw / "train.csv").read_text().splitlines()
  (raw / "train.csv").write_text("".join(
      l + "\n" for l in lines if not l.endswith(",ANG")))      # a class fewer
  with pytest.raises(data_lib.DataError, match="prepared from another copy"):
    data_lib.prepare("crema_d", raw, tmp_path / "prepared")


_PREPARE = """
import sys
sys.path[:0] = [{root!r}]
from arl_jax import data
data.prepare("crema_d", {raw!r}, {out!r})
"""


def test_two_preparations_into_one_folder_wait_for_each_other(tmp_path):
  raw = _crema(tmp_path)
  code = _PREPARE.format(root=str(ROOT), raw=str(raw),
                         out=str(tmp_path / "prepared"))
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  splits = data_lib.load_prepared(
      data_lib.prepare("crema_d", raw, tmp_path / "prepared").data_dir)
  assert sum(len(s) for s in splits.values()) == 12
  np.testing.assert_equal(len(splits["test"]) > 0, True)
