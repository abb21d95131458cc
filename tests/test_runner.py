import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import configs
from experiments import tensorboard
from experiments import train
from experiments.configs import ave
from experiments.configs import crema_d
from experiments.configs import kinetics_sounds
from experiments.configs import synthetic
from experiments.configs import uci

ROOT = pathlib.Path(__file__).resolve().parents[1]


def act_during_training(monkeypatch, epoch, batch, action, seed=None):
  """Calls ``action()`` when the runner's pipeline yields batch ``batch`` of
  ``epoch`` (of the run seeded ``seed``, when given); returns the original
  ``train.load_data``."""
  load = train.load_data

  def load_and_act(config, workdir, **kwargs):
    data = load(config, workdir, **kwargs)
    epoch_batches = data.train

    def batches(e, first=0):
      for i, b in enumerate(epoch_batches(e, first), first):
        if e == epoch and i == batch and seed in (None, config.seed):
          action()
        yield b
    data.train = batches
    return data

  monkeypatch.setattr(train, "load_data", load_and_act)
  return load


def tiny_synthetic(epochs=3, **overrides):
  c = synthetic.get_config()
  c.data.sizes = (512, 128, 256)
  c.num_epochs, c.warmup_epochs, c.optim.decay_epochs = epochs, 1, (2,)
  c.progress = "none"
  c.parallel.devices = 1
  return configs.override(c, overrides)


# ----------------------------------------------------------------- config --

def test_configs_load_and_validate():
  for cfg in (synthetic, uci):
    train.validate_config(cfg.get_config())
  for cfg, t in ((crema_d, 8.0), (kinetics_sounds, 4.0), (ave, 4.0)):
    c = cfg.get_config()
    method = train.make_method(c)
    assert method.temperature == t and method.gamma == 4.0
    c.method.name = "concat"                 # switching keeps each default
    assert train.make_method(c).gamma == 0.0
    assert c.optim.learning_rate == 1e-3 and c.batch_size == 64
    assert c.num_epochs == 100 and tuple(c.optim.decay_epochs) == (70,)
    assert c.optim.clip_norm == 40.0 and c.warmup_epochs == 5
    with pytest.raises(train.ConfigError, match="config.data.path is required"):
      train.validate_config(c)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.method.update(name="arll"), "unknown method 'arll'"),
    (lambda c: c.data.update(source="imagenet"), "unknown data source"),
    (lambda c: c.update(batch_size=0), "batch_size must be an integer >= 1"),
    (lambda c: c.method.update(temperature=-1.0), "temperature must be > 0"),
    (lambda c: c.method.update(gamma=-1.0), "gamma must be >= 0"),
    (lambda c: c.optim.update(name="adam"), "optim.name must be one of"),
    (lambda c: c.optim.update(scale_placement="before"),
     "scale_placement must be one of"),
    (lambda c: c.data.update(source="crema_d", path="/no/such/dir"),
     "does not exist"),
    (lambda c: c.data.update(source="crema_d", path="/", augment="gpu"),
     "augment must be 'host', 'device' or 'auto'"),
    # Each of these used to fail after files were written, train NaN, or be
    # accepted: one message naming the field and what it may be.
    (lambda c: c.model.update(fusion="bogus"),
     r"config.model.fusion must be one of \['concat', 'film', 'gated', "
     r"'shared', 'sum'\]; got 'bogus'"),
    (lambda c: c.optim.update(learning_rate=float("nan")),
     "config.optim.learning_rate must be a finite number > 0; got nan"),
    (lambda c: c.optim.update(learning_rate=-0.01),
     "config.optim.learning_rate must be a finite number > 0; got -0.01"),
    (lambda c: c.update(checkpoint_every_epochs=0),
     "config.checkpoint_every_epochs must be an integer >= 1; got 0"),
    (lambda c: c.update(progress="bogus"),
     r"config.progress must be one of \['auto', 'bar', 'lines', 'none'\]"),
    (lambda c: c.update(batch_size=1024),
     "config.batch_size 1024 is larger than the 512 training rows"),
    (lambda c: c.optim.update(momentum=1.5), "optim.momentum must be in"),
    (lambda c: c.parallel.update(mode="pjit"), "parallel.mode must be one of"),
])
def test_bad_configs_fail_before_training(change, match, tmp_path):
  c = tiny_synthetic()
  change(c)
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_unknown_config_field():
  c = tiny_synthetic()
  c.unlock()
  c.method.temprature = 3.0
  with pytest.raises(train.ConfigError, match="unknown config field "
                     "'method.temprature'"):
    train.validate_config(c)


@pytest.mark.parametrize("override,message", [
    ("--config.nonsense=1", "error: unknown config field 'nonsense' in "
     "'--config.nonsense=1'; known fields here: ['batch_size', "),
    ("--config.model.fusion=bogus", "error: config.model.fusion must be one "
     "of ['concat', 'film', 'gated', 'shared', 'sum']; got 'bogus'."),
])
def test_cli_rejects_a_bad_override_in_one_line(override, message, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config",
       "experiments/configs/synthetic.py", "--workdir", str(tmp_path / "w"),
       override], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().startswith(message), out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------- real runs --

def _check_run(workdir, epochs, modalities, counts=None):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  history = [json.loads(l) for l in lines]
  assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
  for h in history:
    for key in ("train_loss", "val_accuracy", "test_accuracy", "val_macro_f1"):
      assert np.isfinite(h[key])
    assert set(h["a"]) == set(modalities)
    assert all(np.isfinite(v) for v in h["q"].values())
    if counts is not None:     # evaluation counted every row exactly once
      assert (h["val_count"], h["test_count"]) == counts
      # An accuracy is a count of rows over the split's size.
      for split, n in zip(("val", "test"), counts):
        assert h[f"{split}_accuracy"] * n == pytest.approx(
            round(h[f"{split}_accuracy"] * n), abs=1e-6)
  for png in ("training_curves.png", "coefficients.png", "fig3_ratios.png"):
    assert (workdir / png).stat().st_size > 1000
  report = json.loads((workdir / "results.json").read_text())
  # Selection on validation: the first epoch with the best validation
  # accuracy, and the reported test accuracy is that epoch's.
  vals = [h["val_accuracy"] for h in history]
  assert report["best_epoch"] == 1 + int(np.argmax(vals))
  best = history[report["best_epoch"] - 1]
  assert report["test_accuracy_at_best_val"] == best["test_accuracy"]
  assert report["test_accuracy_last"] == history[-1]["test_accuracy"]
  return history, report


def test_short_run_synthetic_and_method_switching(tmp_path):
  reports = {}
  for method in ("concat", "arl", "ogm_ge", "mmpareto", "agm"):
    c = tiny_synthetic(epochs=2)
    c.method.name = method
    reports[method] = train.train_and_evaluate(c, tmp_path / method)
    history, _ = _check_run(tmp_path / method, 2, ("audio", "visual"),
                            counts=(128, 256))
    # Each method's own coefficients: concat reports none, ARL a softmax,
    # OGM-GE damps (epoch means: the dominant modality may change by batch).
    a = history[-1]["a"]
    if method in ("concat", "mmpareto"):   # MMPareto: no coefficients
      assert a == {"audio": 0.0, "visual": 0.0}
    elif method == "arl":
      assert sum(a.values()) == pytest.approx(1.0, abs=1e-5)
      assert history[-1]["scale"] == pytest.approx(
          {m: 1.0 + v for m, v in a.items()}, abs=1e-5)
    elif method == "agm":      # c_m = exp(alpha min(r^ - r, 10)) > 0
      assert all(v > 0 for v in a.values()) and a != {"audio": 1.0,
                                                      "visual": 1.0}
    else:
      assert min(a.values()) < 0.99 and max(a.values()) <= 1.0
    # Trained: well above chance (6 classes) and below the Bayes optimum.
    assert 0.4 < reports[method]["test_accuracy_last"] <= (
        reports[method]["bayes_accuracy"] + 0.05)


def test_short_run_uci(tmp_path):
  c = uci.get_config()
  c.num_epochs, c.warmup_epochs, c.progress = 2, 1, "none"
  c.parallel.devices = 1
  c.data.views = ("fourier", "karhunen", "morphological")
  train.train_and_evaluate(c, tmp_path / "uci")
  _check_run(tmp_path / "uci", 2, ("fourier", "karhunen", "morphological"),
             counts=(400, 400))


# The audio-visual runner path (CREMA-D's ResNet18 config on fake local
# files, frames augmented on the device) runs end to end in
# test_runner_parallel.py, in two processes; Kinetics-Sounds and AVE share it,
# their builders and layouts are tested in test_data.py, their configs above.


# ----------------------------------------------------- resume and workdir --

def _final_state(workdir):
  mngr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints")
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return step, restored.state


@pytest.mark.parametrize("extra", [
    {},
    # OGM-GE's noise key and AdamW's moments must survive the resume too.
    {"method.name": "ogm_ge", "optim.name": "adamw",
     "optim.learning_rate": 1e-3},
], ids=["arl_sgd", "ogm_ge_adamw"])
def test_sigkill_and_resume_gives_identical_results(tmp_path, extra):
  check_sigkill_and_resume(tmp_path, extra)


def check_sigkill_and_resume(tmp_path, extra):
  """A run SIGKILLed in epoch 3 and resumed equals an uninterrupted one."""
  epochs = 4
  overrides = {"data.sizes": (1024, 256, 256), "num_epochs": epochs, **extra}
  reference = tmp_path / "reference"
  train.train_and_evaluate(tiny_synthetic(**overrides), reference)

  killed = tmp_path / "killed"
  # The run kills itself (SIGKILL: no cleanup, no flush) in the middle of
  # epoch 3, after checkpoint 2 was written: the moment is fixed by the
  # training loop itself, not by how fast this machine is.
  script = (
      f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
      f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
      "import os, signal\n"
      "from test_runner import tiny_synthetic\n"
      "from experiments import train\n"
      "load = train.load_data\n"
      "def load_and_die(config, workdir, **kwargs):\n"
      "  data = load(config, workdir, **kwargs)\n"
      "  epoch_batches = data.train\n"
      "  def train_batches(epoch, first=0):\n"
      "    for i, batch in enumerate(epoch_batches(epoch, first), first):\n"
      "      if epoch == 3 and i == 5:\n"
      "        os.kill(os.getpid(), signal.SIGKILL)\n"
      "      yield batch\n"
      "  data.train = train_batches\n"
      "  return data\n"
      "train.load_data = load_and_die\n"
      f"train.train_and_evaluate(tiny_synthetic(**{overrides!r}), "
      f"{str(killed)!r})\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -signal.SIGKILL
  # Checkpoints are numbered by training steps (16 per epoch).
  assert (killed / "checkpoints" / "32").exists()
  assert not (killed / "checkpoints" / "48").exists()
  assert not (killed / "results.json").exists()
  train.train_and_evaluate(tiny_synthetic(**overrides), killed)

  # The log is bit-identical (wall-clock timings live in timings.jsonl).
  assert ((killed / "metrics.jsonl").read_bytes()
          == (reference / "metrics.jsonl").read_bytes())
  assert len((killed / "timings.jsonl").read_text().splitlines()) == epochs
  step_a, state_a = _final_state(reference)
  step_b, state_b = _final_state(killed)
  assert step_a == step_b == epochs * 16
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)   # bitwise
  ra = json.loads((reference / "results.json").read_text())
  rb = json.loads((killed / "results.json").read_text())
  assert ra == rb
  # TensorBoard events: rewritten from the record on the resume, so every
  # epoch appears once, with the values of metrics.jsonl.
  assert (check_events(killed, epochs)
          == check_events(reference, epochs))


def check_events(workdir, epochs, tags=("train/loss", "validation/accuracy",
                                        "test/accuracy", "lr", "a/audio")):
  """The workdir's TensorBoard scalars, read back and checked against
  metrics.jsonl: one value per epoch per tag."""
  events = tensorboard.read_scalars(workdir / "tensorboard")
  log = [json.loads(l) for l in
         (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(events) > 10 and [r["epoch"] for r in log] == list(
      range(1, epochs + 1))
  want = {}
  for record in log:
    for tag, value in tensorboard.scalars(record).items():
      want.setdefault(tag, []).append((record["epoch"], np.float32(value)))
  # Each tag once per epoch that has it (the method's hook records only
  # some epochs), in order, with the log's values.
  assert events == want
  for tag in tags:
    assert tag in events, sorted(events)
  return events


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_synthetic(epochs=1), run)
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  other = tiny_synthetic(epochs=1)
  other.method.name = "concat"
  with pytest.raises(train.ConfigError, match="different config"):
    train.train_and_evaluate(other, run)
  after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  assert before == after


def test_presentation_fields_never_stop_a_resume(tmp_path):
  """TensorBoard off writes no events; a run continues with presentation
  fields changed, also from a config.json written before a field existed."""
  run = tmp_path / "run"
  c = tiny_synthetic(epochs=2)
  c.tensorboard, c.stop_after_epoch = False, 1
  assert train.train_and_evaluate(c, run)["stopped_after_epoch"] == 1
  assert not (run / "tensorboard").exists()
  saved = json.loads((run / "config.json").read_text())
  del saved["tensorboard"]          # as an older version wrote it
  (run / "config.json").write_text(json.dumps(saved))
  c.tensorboard, c.stop_after_epoch, c.progress = True, 0, "lines"
  report = train.train_and_evaluate(c, run)
  assert report["epochs"] == 2
  assert (run / "tensorboard").exists()


# ------------------------------------------------ imbalance diagnostics --

def tiny_imbalance(**overrides):
  from experiments.configs import imbalance
  c = imbalance.get_config()
  c.data.sizes = (512, 256, 512)
  c.num_epochs, c.warmup_epochs, c.optim.decay_epochs = 2, 1, (2,)
  c.progress, c.plots = "none", False
  c.parallel.devices = 1
  return configs.override(c, overrides)


def test_imbalance_run_reports_probes_fusion_weights_and_predictions(tmp_path):
  c = tiny_imbalance(**{"method.name": "arl",
                        "method.estimator": "heldout_variance",
                        "method.ema": 0.9})
  report = train.train_and_evaluate(c, tmp_path / "arl")
  history = [json.loads(l) for l in
             (tmp_path / "arl" / "metrics.jsonl").read_text().splitlines()]
  # Probes at the selected and the last epoch, for every modality.
  assert set(report["probe_accuracy_at_best_val"]) == {"a", "b"}
  assert 0.2 < report["probe_accuracy_last"]["b"]["test"] <= 1.0
  for name in ("inverse_variance", "calibrated"):
    f = report["fusion"][name]
    assert 1 <= f["best_epoch"] <= 2 and set(f["weights_at_best_val"]) == {
        "a", "b"}
    # Its own selection on validation: the epoch with the best weighted val.
    vals = [h["fusion"][name]["val_accuracy"] for h in history]
    assert f["best_epoch"] == 1 + int(np.argmax(vals))
  assert set(history[-1]["test_true_class_variance"]) == {"a", "b"}
  z = np.load(tmp_path / "arl" / "predictions.npz")
  assert z["test_log_probs"].shape == (512, 4)
  np.testing.assert_allclose(np.exp(z["test_log_probs"]).sum(-1), 1.0,
                             rtol=1e-5)
  assert report["bayes_true_class_variance"]["a"] > 0


def test_a_best_epochs_probe_waits_for_the_checkpoint_and_resumes_exactly(
    tmp_path):
  """The probe of a new best epoch is computed when it is still the best at
  the next checkpoint (or the last epoch): the same figures as probing
  every best epoch at once, and the same record after a stop and resume."""
  base = {"method.name": "concat", "num_epochs": 6,
          "optim.decay_epochs": (5,)}
  eager = train.train_and_evaluate(
      tiny_imbalance(**base, checkpoint_every_epochs=1), tmp_path / "eager")
  runs = {}
  for name, stop in (("reference", 0), ("stopped", 3)):
    c = tiny_imbalance(**base, checkpoint_every_epochs=3)
    c.stop_after_epoch = stop
    report = train.train_and_evaluate(c, tmp_path / name)
    if stop:
      assert report["stopped_after_epoch"] == 3
      c.stop_after_epoch = 0
      report = train.train_and_evaluate(c, tmp_path / name)
    runs[name] = report
    check_events(tmp_path / name, 6, ("train/loss", "a/b",
                                      "probe_accuracy/b/test"))
  reference = runs["reference"]
  assert reference == runs["stopped"]
  log = lambda name: (tmp_path / name / "metrics.jsonl").read_text()
  assert log("reference") == log("stopped")
  for key in ("probe_accuracy_at_best_val", "probe_accuracy_last",
              "best_epoch", "test_accuracy_at_best_val"):
    assert reference[key] == eager[key], key
  # Probed: the best epoch as of each checkpoint, and the last epoch; the
  # eager run probes every epoch that was a new best.
  probed = [json.loads(l)["epoch"] for l in log("reference").splitlines()
            if "probe_accuracy" in json.loads(l)]
  assert {reference["best_epoch"], 6} <= set(probed)
  eager_probed = [json.loads(l)["epoch"] for l in log("eager").splitlines()
                  if "probe_accuracy" in json.loads(l)]
  assert set(probed) <= set(eager_probed)


def test_one_modality_alone_zeroes_the_others(tmp_path):
  report = train.train_and_evaluate(
      tiny_imbalance(**{"method.name": "concat", "data.only_modality": "b"}),
      tmp_path / "alone")
  assert report["only_modality"] == "b"
  # The zeroed modality's encoder learns nothing about the labels.
  assert report["probe_accuracy_last"]["a"]["test"] < 0.35


@pytest.mark.parametrize("overrides,match", [
    ({"method.name": "arl", "method.estimator": "heldout_entropy",
      "data.heldout_fraction": 0.0}, "needs held-out rows"),
    ({"method.name": "arl", "method.estimator": "entropy"},
     "unknown estimator"),
    ({"data.only_modality": "z"}, "only_modality 'z' is not one of"),
    ({"data.setting": "nope"}, "data.setting must be one of"),
    ({"data.heldout_fraction": 0.7}, r"heldout_fraction must be in \[0, 0.5\)"),
])
def test_bad_imbalance_configs_fail_before_training(overrides, match, tmp_path):
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(tiny_imbalance(**overrides), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_runner_passes_skip_invalid_to_the_preparation(tmp_path):
  from arl_jax import data as data_lib
  from benchmarks import fake_data
  root = fake_data.write_fake_crema_d(tmp_path / "raw", sentences=("DFA",),
                                     frames=1, seconds=0.5)
  clip = "1001_DFA_NEU_XX"
  for name in ("train.csv", "test.csv"):
    path = root / name
    path.write_text(path.read_text().replace(f"{clip},NEU", f"{clip},CALM"))
  c = crema_d.get_config()
  c.data.path, c.data.image_size = str(root), 32
  with pytest.raises(data_lib.DataError, match=f"{clip}.*unknown label 'CALM'"):
    train.load_data(c, tmp_path / "strict")
  c.data.skip_invalid = True
  data = train.load_data(c, tmp_path / "lenient")
  report = next((tmp_path / "lenient" / "data").rglob("prepare_report.json"))
  assert [r["clip_id"] for r in json.loads(report.read_text())["skipped"]] == [
      clip]
  assert data.train_rows > 0


# ------------------------------------------------------ audio-visual digits --

def test_av_digits_run_holds_out_a_whole_speaker(tmp_path):
  from arl_jax.data import fsdd
  from experiments.configs import av_digits
  if fsdd.default_root() is None:
    pytest.skip("no local FSDD copy")
  c = av_digits.get_config()
  c.num_epochs, c.warmup_epochs, c.optim.decay_epochs = 2, 1, (2,)
  c.method.name = "arl"
  c.method.estimator = "heldout_error"
  c.data.prepared_dir = str(tmp_path / "data")
  c.progress, c.plots, c.parallel.devices = "none", False, 1
  report = train.train_and_evaluate(c, tmp_path / "run")
  speakers = report["speakers"]
  held = report["heldout_speakers"]
  assert len(held) == 1 and held[0] in speakers["train"]
  assert not set(speakers["test"]) & set(speakers["train"])
  assert set(report["probe_accuracy_last"]) == {"audio", "image"}
  assert set(report["fusion"]["calibrated"]["weights_at_best_val"]) == {
      "audio", "image"}
  assert 0.1 < report["test_accuracy_last"] <= 1.0


@pytest.mark.parametrize("overrides,match", [
    ({"data.heldout_by_group": True}, "heldout_by_group needs a source"),
    ({"model.encoder": "cnn"}, "encoder 'cnn' needs 2-D inputs"),
    ({"data.audio_pool": (0, 2)}, "data.audio_pool must be two integers"),
])
def test_bad_grouping_and_encoder_configs_fail_before_training(
    overrides, match, tmp_path):
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(tiny_imbalance(**overrides), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_loss_jump_of_an_order_of_magnitude_is_flagged():
  history = [{"train_loss": 1.8}, {"train_loss": 0.2}]
  assert train._loss_jump(history, 0.9) is None
  assert train._loss_jump(history, 2.1) == pytest.approx(10.5)
  # A wobble of a nearly zero loss is not instability.
  assert train._loss_jump([{"train_loss": 0.001}], 0.05) is None
  assert train._loss_jump([], 30.0) is None


def test_unstable_run_says_so_in_its_log(tmp_path, capfd):
  # SGD at a learning rate far past its stability limit: the loss jumps but
  # stays finite (clipping), and the log and the record say so.
  c = tiny_synthetic(epochs=3, **{"method.name": "unimodal_regularisation",
                                  "optim.learning_rate": 0.5})
  train.train_and_evaluate(c, tmp_path / "run")
  history = [json.loads(l) for l in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  jumps = [h for h in history if "loss_jump" in h]
  err = capfd.readouterr().err
  assert jumps and "training is unstable" in err
