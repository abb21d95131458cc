"""The trainer: ``train_and_evaluate(config, workdir) -> final metrics``.

One epoch loop around :func:`arl_jax.make_train_step`, with orbax
checkpoints (every ``checkpoint_every_epochs``, at the end, and at the step
boundary after SIGTERM/SIGINT; verified by SHA-256 before a restore, see
:mod:`experiments.workdir`), one run per workdir (a lock), per-epoch metrics
in ``workdir/metrics.jsonl`` (a log; the run's record lives in the
checkpoint), wall-clock timings in ``workdir/timings.jsonl``, model selection
on the validation split only, and plots. An interrupted run resumes from
``workdir`` bit-identically on CPU (metrics, results, predictions, state).
The method is data (``config.method.name``): the trainer never looks at
which one it runs.

The pieces, one module each: :mod:`experiments.config_checks` (what a config
may hold), :mod:`experiments.input_pipeline` (the data),
:mod:`experiments.evaluation` (metrics, records, features) and
:mod:`experiments.checkpoints`; this module builds the model and the
optimiser and runs the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import arl_jax
from arl_jax import data as data_lib
from arl_jax import fusion_weighting
from arl_jax import modality_values
from arl_jax import models
from experiments import diagnostics
from experiments import distributed
from experiments import evaluation
from experiments import tensorboard
from experiments import workdir as workdir_lib

# Names of the trainer's pieces, also read (and replaced, in tests) as
# ``experiments.train.<name>``: the loop below calls them through this
# module's globals.
from experiments.checkpoints import Checkpoints as _Checkpoints
from experiments.config_checks import AV_SOURCES
from experiments.config_checks import ConfigError
from experiments.config_checks import make_method
from experiments.config_checks import validate_config
from experiments.evaluation import encoder_distance
from experiments.evaluation import epoch_record
from experiments.evaluation import evaluate
from experiments.input_pipeline import Data
from experiments.input_pipeline import load_data

# ------------------------------------------------------------------- model --

def build_model(config, data: Data):
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  if config.data.source in AV_SOURCES:
    audio_shape = tuple(data.example["audio"].shape[1:])
    return models.audio_visual_classifier(
        data.num_classes, audio_shape=audio_shape,
        num_frames=config.data.num_frames, image_size=config.data.image_size,
        fusion=config.model.fusion, dtype=dtype)
  dims = {m: int(v.shape[-1]) for m, v in data.example.items()}
  cnn = {}
  if config.model.encoder == "cnn":
    cnn = {"encoders": "cnn", "input_shapes": data.extra["input_shapes"],
           "cnn_pool": data.extra["cnn_pool"]}
  return models.multiview_classifier(
      dims, data.num_classes, encoder_widths=tuple(config.model.encoder_widths),
      fusion=config.model.fusion, dtype=dtype, **cnn)


def make_optimizer(config, data: Data):
  """The configured optimiser with ARL's per-modality scales where they act.

  ``optim.name``: ``sgd`` (the paper's: momentum, coupled weight decay),
  ``adamw`` or ``lion`` (decoupled weight decay); all after gradient-norm
  clipping. ``optim.scale_placement``: see
  :func:`arl_jax.with_modality_scales` (``auto``: on the gradient for SGD,
  the paper's scaling; after the optimiser for AdamW and Lion).
  """
  o = config.optim
  steps = data.steps_per_epoch
  schedule = optax.piecewise_constant_schedule(
      o.learning_rate, {int(e) * steps: o.decay_factor for e in o.decay_epochs})
  if o.name == "sgd":
    inner = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                        optax.add_decayed_weights(o.weight_decay),
                        optax.sgd(schedule, momentum=o.momentum))
  elif o.name == "adamw":
    inner = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                        optax.adamw(schedule, weight_decay=o.weight_decay))
  else:
    inner = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                        optax.lion(schedule, weight_decay=o.weight_decay))
  tx = arl_jax.with_modality_scales(
      inner, arl_jax.label_modalities(data.modalities),
      placement=o.scale_placement, noise_seed=config.seed)
  return tx, schedule


# ------------------------------------------------------------------ workdir --

_write_atomic = workdir_lib.write_atomic


# Presentation-only fields: they may change between a run and its
# resumption.
_PRESENTATION = ("progress", "plots", "tensorboard", "stop_after_epoch")


def _config_json(config) -> str:
  c = ml_collections.ConfigDict(config.to_dict())
  for key in _PRESENTATION:
    c[key] = None
  return c.to_json(sort_keys=True)


def _same_run(recorded: dict, config) -> bool:
  """Whether a workdir's config.json records ``config``'s run (presentation
  fields aside, also those an older version did not write)."""
  current = json.loads(_config_json(config))
  drop = lambda d: {k: v for k, v in d.items() if k not in _PRESENTATION}
  return drop(recorded) == drop(current)


def _check_workdir(config, workdir: pathlib.Path) -> None:
  saved = workdir / "config.json"
  ckpt = workdir / "checkpoints"
  if saved.exists():
    try:
      recorded = json.loads(saved.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise ConfigError(
          f"{saved} is not JSON ({type(e).__name__}): this workdir's record "
          "is damaged, so it cannot be resumed safely; use another --workdir "
          "(nothing was changed).") from None
    if not _same_run(recorded, config):
      raise ConfigError(
          f"{workdir} holds a run with a different config ({saved}); use "
          "another --workdir (nothing was changed).")
  elif ckpt.exists() and any(ckpt.iterdir()):
    raise ConfigError(f"{ckpt} holds checkpoints but {saved} is missing: not "
                      "resuming an unknown run (nothing was changed).")


class _Progress:
  """tqdm bar on a terminal, one line per epoch otherwise."""

  def __init__(self, mode: str, total: int, desc: str):
    interactive = sys.stderr.isatty() if mode == "auto" else mode == "bar"
    self.interactive = interactive
    self.bar = None
    self.lines = mode in ("auto", "lines") and not interactive
    if interactive:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

  def step(self, metrics, i):
    if self.bar is not None:
      self.bar.update(1)
      if i % 10 == 0:       # (the mean over the seeds of a multi-seed run)
        self.bar.set_postfix(
            loss=f"{float(np.mean(metrics['loss'])):.3f}",
            acc=f"{float(np.mean(metrics['accuracy'])):.3f}")

  def epoch(self, record, seed=None):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.lines or self.bar is not None or self.interactive:
      print(("" if seed is None else f"seed {seed}  ") +
            f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.4f}  val acc "
            f"{record['val_accuracy']:.4f}  a = "
            + " ".join(f"{m}:{v:.3f}" for m, v in record["a"].items()),
            flush=True)


# ------------------------------------------------------------------- train --

class TrainingDiverged(RuntimeError):
  """The training loss stopped being finite; nothing of the epoch was kept."""


def _lock(workdir: pathlib.Path, writer: bool) -> workdir_lib.WorkdirLock:
  """Process 0 locks the workdir; every process learns whether it could."""
  lock = workdir_lib.WorkdirLock(workdir)
  error = None
  if writer:
    try:
      lock.acquire()
    except workdir_lib.WorkdirBusy as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    busy = int(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None)))
    if busy and error is None:
      error = lock._busy()
  if error is not None:
    raise error
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict:
  """Trains ``config`` in ``workdir`` (resuming it if interrupted).

  Returns the final report (also written to ``workdir/results.json``): test
  accuracy and macro-F1 at the best *validation* epoch and at the last epoch.

  Raises :class:`ConfigError` (before anything is written),
  :class:`experiments.workdir.WorkdirBusy` (another run holds ``workdir``),
  :class:`experiments.workdir.Preempted` (SIGTERM/SIGINT: the state was
  saved at a step boundary; calling again resumes exactly there) and
  :class:`TrainingDiverged`.
  """
  validate_config(config)
  try:
    topology = distributed.make_topology(config.parallel.mode,
                                         config.parallel.devices)
    for name in ("batch_size", "eval_batch_size"):
      topology.check_batch_size(config[name], f"config.{name}")
  except distributed.TopologyError as e:
    raise ConfigError(str(e)) from None
  workdir = pathlib.Path(workdir)
  if topology.is_writer:
    _refuse_foreign(workdir)          # before the lock: nothing touched
  created = not workdir.exists()
  setup = {"wrote_config": False, "saved": False}
  try:
    lock = _lock(workdir, topology.is_writer)
  except OSError as e:
    raise workdir_lib.WorkdirError(workdir_lib.describe_os_error(
        e, "cannot create the run's folder or lock")) from e
  # One process cannot stop a collective run alone: several processes stop
  # on SIGTERM through JAX's preemption service (every process saves at the
  # same step); one process handles SIGTERM and Ctrl-C itself.
  signals = () if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  try:
    with workdir_lib.Preemption(signals) as preempt:
      return _train_locked(config, workdir, topology, preempt, lock, setup)
  except ConfigError:
    _forget_setup(workdir, created, topology, lock, setup)
    raise
  except data_lib.DataError:
    _forget_setup(workdir, created, topology, lock, setup)
    raise
  except ValueError as e:
    # Refused where the step is built or first traced (a method option the
    # model cannot serve): as a config error, and the config.json this
    # invocation wrote goes, so the corrected command is not refused as "a
    # different config".
    if setup["saved"] or not setup["wrote_config"]:
      raise
    _forget_setup(workdir, created, topology, lock, setup)
    raise ConfigError(f"the run cannot start with this config: {e}") from e
  except (OSError, RuntimeError) as e:
    if isinstance(e, (workdir_lib.WorkdirError, workdir_lib.WorkdirBusy,
                      TrainingDiverged)):
      raise
    err = workdir_lib.os_error_in(e)
    if err is None:
      raise
    raise workdir_lib.WorkdirError(workdir_lib.describe_os_error(err)) from e
  finally:
    lock.release()


# What a run of ours can leave in its workdir before config.json exists.
_BEFORE_CONFIG = frozenset({".lock", "data", "checkpoints", "config.json.tmp"})


def _refuse_foreign(workdir: pathlib.Path) -> None:
  """Refuses a --workdir that is a file, or a non-empty folder that holds no
  run of ours (a user's own files would be overwritten)."""
  if workdir.exists() and not workdir.is_dir():
    raise workdir_lib.WorkdirError(
        f"--workdir {workdir} is a file, not a folder; choose another "
        "--workdir.")
  if not workdir.is_dir() or (workdir / "config.json").exists():
    return
  foreign = sorted(p.name for p in workdir.iterdir()
                   if p.name not in _BEFORE_CONFIG)
  if foreign:
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    raise ConfigError(
        f"{workdir} is not empty and holds no arl_jax run (no config.json; "
        f"it holds {shown}): use a new or empty --workdir (nothing was "
        "changed).")


def _forget_setup(workdir, created, topology, lock, setup) -> None:
  """A run refused before its first checkpoint leaves no record: the
  config.json it wrote goes, and a workdir it created goes whole."""
  if not topology.is_writer:
    return
  if setup["wrote_config"]:
    (workdir / "config.json").unlink(missing_ok=True)
    setup["wrote_config"] = False
  if created and workdir.is_dir() and all(
      p.name in (".lock", "config.json.tmp") for p in workdir.iterdir()):
    lock.release()
    shutil.rmtree(workdir)      # refused before writing: leave no trace


def _event_log(workdir: pathlib.Path, history: list[dict]):
  """TensorBoard events of the record (None without tensorboardX)."""
  try:
    return tensorboard.EventLog(workdir, history)
  except ImportError:
    workdir_lib.log("tensorboardX is not installed: no TensorBoard events (pip install "
         "'.[experiments]'); metrics.jsonl has every figure.")
    return None


def _read_log(path: pathlib.Path, last_epoch: int) -> list[dict]:
  """Records of epochs <= ``last_epoch`` from a JSONL log (a log, not the
  run's record: a torn line -- what a kill mid-write leaves -- is dropped, a
  missing file is empty)."""
  out = []
  if path.exists():
    # Bytes that are not UTF-8 (garbage) are lines that do not parse.
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("epoch", 0) <= last_epoch:
        out.append(record)
  return out


def _feature_batches(data: Data, split: str):
  """The rows of ``split`` as evaluation batches for the encoders' features:
  an in-memory split ``chunk`` rows at a time, an audio-visual one its
  unaugmented evaluation batches (``data.train_eval`` for ``"train"``)."""
  if data.splits is None:
    return data.train_eval if split == "train" else data.evaluate[split]
  x, y = data.splits[split]
  chunk = 1024
  return lambda: ({"inputs": {m: v[i:i + chunk] for m, v in x.items()},
                   "labels": y[i:i + chunk]} for i in range(0, len(y), chunk))


def _loss_jump(history: list[dict], loss: float, factor: float = 10.0,
               floor: float = 1.0) -> float | None:
  """``loss`` over the lowest earlier epoch's mean training loss, when it is
  at least ``factor`` (an order of magnitude: unstable training) and the
  loss is at least ``floor`` (not a wobble of a nearly zero loss); else
  None."""
  earlier = [h["train_loss"] for h in history
             if h.get("train_loss") is not None]
  if not earlier or not min(earlier) > 0:
    return None
  ratio = loss / min(earlier)
  return float(ratio) if ratio >= factor and loss >= floor else None


@jax.jit
def _stack_steps(step_metrics: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)


def _host_metrics(step_metrics: list, to_host) -> dict:
  # Stacked on the device in one dispatch (one stack per metric cost a
  # dispatch each), then one transfer per metric, not per step; then plain
  # dicts ({modality: [steps]}), which the checkpoint and the log keep.
  return modality_values.as_dicts(to_host(_stack_steps(step_metrics)))


def _mean(partial, stacked) -> dict:
  """Per-metric means over the epoch's steps, those before a resume first."""
  parts = [t for t in (partial, stacked) if t is not None]
  whole = jax.tree.map(lambda *xs: np.concatenate(
      [np.asarray(x) for x in xs]), *parts)
  return jax.tree.map(lambda x: float(np.mean(x)), whole)


def _seed_config(config, seed: int):
  """``config`` for one seed of a multi-seed run."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed, c.num_seeds = seed, 1
  return c


class _SeedAxis:
  """The seeds of a run: one (no axis, the plain step) or several, stacked
  on a leading axis of the state, the batches and the step's outputs."""

  def __init__(self, config, workdir: pathlib.Path):
    self.n = config.num_seeds
    self.seeds = [config.seed + k for k in range(self.n)]
    self.stacked = self.n > 1
    # Each seed's outputs: the workdir itself (one seed) or seed<s>/ in it.
    self.dirs = ([workdir] if not self.stacked else
                 [workdir / f"seed{s}" for s in self.seeds])

  def stack(self, trees: list) -> Any:
    if not self.stacked:
      return trees[0]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                        *trees)

  def take(self, tree: Any, k: int) -> Any:
    """Seed ``k``'s part of a stacked (host) tree."""
    if not self.stacked:
      return tree
    return jax.tree.map(lambda x: x[k], tree)

  def take_steps(self, tree: Any, k: int) -> Any:
    """Seed ``k``'s part of step metrics stacked as ``[steps, seeds, ...]``."""
    if not self.stacked or tree is None:
      return tree
    return jax.tree.map(lambda x: np.asarray(x)[:, k], tree)

  def evaluate(self, eval_step, state, batches, num_classes, logits) -> list:
    """:func:`evaluate` of every seed: one pass over the split's batches."""
    outs = [eval_step(state, b) for b in batches()]
    return [evaluate(lambda _, out, k=k: self.take(out, k), None,
                     lambda: iter(outs), num_classes, logits=logits)
            for k in range(self.n)]

  def heldout(self, eval_step, state, batches) -> list:
    """Every seed's held-out logits (:class:`FusionLogits`)."""
    outs = [eval_step(state, b) for b in batches]
    return [fusion_weighting.collect_logits(
        lambda _, out, k=k: self.take(out, k), None, outs)
            for k in range(self.n)]


def _train_locked(config, workdir: pathlib.Path, topology,
                  preempt: workdir_lib.Preemption,
                  lock: workdir_lib.WorkdirLock, setup: dict) -> dict:
  writer = topology.is_writer
  if workdir.exists():
    _check_workdir(config, workdir)
  distributed.barrier("workdir checked")
  method = make_method(config)
  seeds = _SeedAxis(config, workdir)
  configs = ([config] if not seeds.stacked else
             [_seed_config(config, s) for s in seeds.seeds])

  def load_all():
    return [load_data(c, workdir, attach_heldout=method.needs_heldout,
                      topology=topology) for c in configs]

  if writer:
    datas = load_all()
  distributed.barrier("data prepared")       # one process prepares a TFDS data set
  if not writer:
    datas = load_all()
  data = datas[0]       # the seeds differ in their batch order only
  if data.steps_per_epoch < 1:
    raise ConfigError(
        f"config.batch_size {config.batch_size} is larger than the "
        f"{data.train_rows} training rows: choose at most {data.train_rows}.")
  if writer:
    setup["wrote_config"] = not (workdir / "config.json").exists()
    _write_atomic(workdir / "config.json", _config_json(config))
    for d in seeds.dirs:
      d.mkdir(exist_ok=True)

  if "batches_per_epoch" in {f.name for f in dataclasses.fields(method)}:
    # MLA's alpha_t counts batches within an epoch.
    method = dataclasses.replace(method,
                                 batches_per_epoch=data.steps_per_epoch)
  model = build_model(config, data)
  apply_fn = models.make_apply_fn(model, with_features=method.needs_features)
  # The encoders' evaluation-mode features: linear probes, epoch hooks.
  feature_fn = jax.jit(lambda st, x: model.apply(
      {"params": st.params, **st.model_state}, x, train=False,
      features_only=True))
  features = feature_fn if config.diagnostics.linear_probe else None
  states, hooks, initial_params = [], [], []
  for c, d in zip(configs, datas):
    params, model_state = models.init_model(model, jax.random.PRNGKey(c.seed),
                                            d.example)
    tx, schedule = make_optimizer(c, d)   # the seeds differ in tx.init only
    initial_params.append(jax.device_get(params))
    state = arl_jax.TrainState.create(params=params, tx=tx,
                                      model_state=model_state,
                                      rng=jax.random.PRNGKey(c.seed + 1),
                                      method=method, modalities=d.modalities)
    hook = arl_jax.epoch_hooks.EpochHook(
        method, apply_fn=apply_fn, tx=tx, num_classes=d.num_classes,
        modalities=d.modalities, num_epochs=config.num_epochs, seed=c.seed,
        train_batches=d.train, validation_batches=d.evaluate["validation"],
        feature_batches={split: _feature_batches(d, split)
                         for split in ("train", "validation")},
        train_preprocess=d.train_preprocess,
        eval_preprocess=d.eval_preprocess)
    states.append(jax.device_get(state) if seeds.stacked else state)
    hooks.append(hook)
  seed_hooks = (arl_jax.epoch_hooks.SeedEpochHooks(hooks) if seeds.stacked
                else None)

  def run_hook(epoch: int, st) -> tuple[Any, list[dict]]:
    """The epoch hook of every seed (G-Blending's copies of all seeds in
    one program); one record per seed."""
    if seeds.stacked:
      return seed_hooks(epoch, st)
    st, record = hooks[0](epoch, st)
    return st, [record]

  state = seeds.stack(states)
  if method.has_epoch_hook:
    # "Epoch 0": before training (PMR's first prototypes, G-Blending's
    # first weights). Also when resuming: the checkpoint's state (which
    # replaces this one) is restored into this structure (G-Blending then
    # repeats its first estimation, deterministically, for nothing).
    state, _ = run_hook(0, state)
  state = topology.put_state(state)
  # A method with its official epoch window (OGM-GE, AGM, PMR) replaces the
  # shared warm-up by it.
  warmup_epochs = (0 if method.modulation_window() is not None
                   else config.warmup_epochs)

  def make_step(axis_name):
    return arl_jax.make_train_step(
        apply_fn, tx, method,
        warmup_steps=warmup_epochs * data.steps_per_epoch,
        steps_per_epoch=data.steps_per_epoch,
        preprocess=data.train_preprocess,
        check_tx=config.optim.check_scales, axis_name=axis_name,
        normalize_loss_weights=(config.optim.normalize_loss_weights
                                and not method.alternating))

  def make_eval(axis_name):
    return arl_jax.make_eval_step(apply_fn, preprocess=data.eval_preprocess,
                                  method=method, axis_name=axis_name)

  local = (lambda b: b) if data.sharded_by_process else topology.local_part
  if seeds.stacked:
    # One program for every seed: the step vmapped over the seed axis.
    train_step = topology.seeds_train_step(make_step(None),
                                           config.seed_program)
    run_eval = topology.seeds_eval_step(make_eval(None), config.seed_program)
    put_batch = topology.put_seed_batch
  else:
    train_step = topology.train_step(make_step)
    run_eval = topology.eval_step(make_step=make_eval)
    put_batch = topology.put_batch
  eval_step = lambda st, batch, **kw: run_eval(st, local(batch), **kw)
  weigh_fusion = (data.heldout is not None
                  and config.model.fusion in fusion_weighting.ADDITIVE_FUSIONS)

  checkpoints = _Checkpoints(workdir, topology)
  # The run's whole record lives in the checkpoint: metrics.jsonl and
  # timings.jsonl are logs rewritten from it, never read to resume.
  meta = {"epoch": 0, "position": None,
          "seeds": [{"best_val": -1.0, "best_epoch": 0, "history": []}
                    for _ in range(seeds.n)]}
  partial = None
  best_predictions = [None] * seeds.n
  restored = checkpoints.restore(state)
  if restored is not None:
    state, saved_meta, partial, saved_predictions = restored
    saved_meta.pop("has_predictions", None)
    if "seeds" not in saved_meta:        # one seed, written before seeds
      one = {k: saved_meta.pop(k) for k in ("best_val", "best_epoch")}
      one["history"] = saved_meta.pop("history", None)
      if one["history"] is None:         # written before the record moved
        one["history"] = _read_log(workdir / "metrics.jsonl",
                                   saved_meta["epoch"])
      saved_meta["seeds"] = [one]
      saved_predictions = (None if saved_predictions is None
                           else {"0": saved_predictions})
    meta.update(saved_meta)
    if saved_predictions is not None:
      best_predictions = [saved_predictions.get(str(k))
                          for k in range(seeds.n)]
  runs = meta["seeds"]
  history_paths = [d / "metrics.jsonl" for d in seeds.dirs]
  timings_paths = [d / "timings.jsonl" for d in seeds.dirs]
  distributed.barrier("state restored")
  events = [None] * seeds.n
  if writer:
    for k in range(seeds.n):
      _write_atomic(history_paths[k], "".join(
          workdir_lib.json_line(h) for h in runs[k]["history"]))
      _write_atomic(timings_paths[k], "".join(
          workdir_lib.json_line(t)
          for t in _read_log(timings_paths[k], meta["epoch"])))
      if config.tensorboard:
        events[k] = _event_log(seeds.dirs[k], runs[k]["history"])

  steps = data.steps_per_epoch
  position = meta.pop("position") or {"epoch": meta["epoch"] + 1, "batch": 0}
  multi = jax.process_count() > 1

  def stop_requested(done: int) -> int:
    if multi:
      from jax.experimental import multihost_utils
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(
          done) else 0
    return preempt.requested

  def predictions_item():
    if all(p is None for p in best_predictions):
      return None
    return {str(k): p for k, p in enumerate(best_predictions)
            if p is not None}

  def probe(host_state_k) -> dict:
    return diagnostics.linear_probe_accuracy(
        functools.partial(features, host_state_k), data.splits,
        data.num_classes, data.modalities)

  pending_probes = [None] * seeds.n

  def flush_probe(k: int) -> None:
    """The probe of seed ``k``'s best epoch so far, if it waits: into that
    epoch's record (the run's record, metrics.jsonl and TensorBoard)."""
    if pending_probes[k] is None:
      return
    epoch, host_state_k = pending_probes[k]
    pending_probes[k] = None
    history = runs[k]["history"]
    record = history[epoch - 1]
    assert record["epoch"] == epoch, (record["epoch"], epoch)
    record["probe_accuracy"] = workdir_lib.finite_or_none(probe(host_state_k))
    if writer:
      lock.check_held()
      _write_atomic(history_paths[k], "".join(
          workdir_lib.json_line(h) for h in history))
      if events[k] is not None:
        events[k].add({"epoch": epoch,
                       "probe_accuracy": record["probe_accuracy"]})

  def save(epoch: int, batch: int, step_metrics) -> None:
    """Checkpoint after ``batch`` of the ``steps`` batches of ``epoch``;
    mid-epoch, with the epoch's step metrics so far."""
    for k in range(seeds.n):
      flush_probe(k)        # the checkpoint's record is complete
    mid = batch < steps
    stacked = None
    if mid:
      parts = [t for t in (partial, _host_metrics(step_metrics,
                                                  topology.to_numpy))
               if t is not None]
      stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    lock.check_held()
    with preempt.saving():
      checkpoints.save((epoch - 1) * steps + batch, state,
                       {**meta, "position": ({"epoch": epoch, "batch": batch}
                                             if mid else None)}, stacked,
                       predictions_item())
    setup["saved"] = True

  def seed_batches(epoch: int, first: int):
    if not seeds.stacked:
      yield from data.train(epoch, first)
      return
    for parts in zip(*(d.train(epoch, first) for d in datas)):
      yield seeds.stack(list(parts))

  for epoch in range(position["epoch"], config.num_epochs + 1):
    start = time.perf_counter()
    first = position["batch"] if epoch == position["epoch"] else 0
    if epoch != position["epoch"]:
      partial = None
    progress = _Progress(config.progress if writer else "none", steps,
                         f"epoch {epoch}/{config.num_epochs}")
    step_metrics = []
    for i, batch in enumerate(seed_batches(epoch, first), first):
      state, metrics = train_step(state, put_batch(local(batch)))
      step_metrics.append(metrics)
      progress.step(metrics, i)
      if i + 1 < steps and (signum := stop_requested(
          (epoch - 1) * steps + i + 1)):
        save(epoch, i + 1, step_metrics)
        checkpoints.close()
        raise workdir_lib.Preempted(
            signum, f"batch {i + 1} of {steps} of epoch {epoch}", workdir)
    epoch_metrics = (_host_metrics(step_metrics, topology.to_numpy)
                     if step_metrics else None)
    trains = [_mean(seeds.take_steps(partial, k),
                    seeds.take_steps(epoch_metrics, k))
              for k in range(seeds.n)]
    train_s = time.perf_counter() - start   # the steps and the pipeline
    diverged = [s for s, t in zip(seeds.seeds, trains)
                if not np.isfinite(t["loss"])]
    if diverged:
      checkpoints.close()
      which = "" if not seeds.stacked else f" (seed {diverged})"
      raise TrainingDiverged(
          f"training diverged in epoch {epoch}{which}: the mean training "
          f"loss is {trains[seeds.seeds.index(diverged[0])]['loss']} "
          f"(config.optim.learning_rate = {config.optim.learning_rate}); "
          "nothing of this epoch was saved.")
    vals = seeds.evaluate(eval_step, state, data.evaluate["validation"],
                          data.num_classes, weigh_fusion)
    tests = seeds.evaluate(eval_step, state, data.evaluate["test"],
                           data.num_classes, weigh_fusion)
    helds = (seeds.heldout(eval_step, state, data_lib.iterate_batches(
        *data.heldout, config.eval_batch_size)) if weigh_fusion else None)
    step_count = int(np.ravel(topology.host(state.step))[0])
    host_state = None
    if features is not None or method.has_epoch_hook:
      host_state = topology.host(state)  # one transfer, read by both
    hook_records = [{}] * seeds.n
    fusions = (evaluation.weighted_evaluations(helds, vals, tests)
               if weigh_fusion else None)
    if method.has_epoch_hook:
      # Outside jit, after the epoch's evaluation; what it changes is in
      # the checkpoint below.
      new_state, hook_records = run_hook(epoch, host_state)
    for k in range(seeds.n):
      run, history = runs[k], runs[k]["history"]
      train, val, test = trains[k], vals[k], tests[k]
      jump = _loss_jump(history, train["loss"])
      if jump is not None and writer:
        workdir_lib.log(
            f"warning: epoch {epoch}'s mean training loss {train['loss']:.3g} "
            f"is {jump:.0f}x the lowest earlier epoch's"
            + (f" (seed {seeds.seeds[k]})" if seeds.stacked else "") +
            f": training is unstable (learning rate "
            f"{config.optim.learning_rate} too high for this loss; the end "
            "of warm-up raises the unimodal loss weight, see "
            "config.optim.normalize_loss_weights).")
      record = epoch_record(epoch, train, val, test,
                            schedule(step_count - 1), data.modalities)
      new_best = val["accuracy"] > run["best_val"]
      last = epoch == config.num_epochs
      if features is not None:
        # Only where it is reported: the selected epoch and the last one.
        # A new best epoch's probe waits (its encoders kept on the host)
        # until the next checkpoint or the last epoch: most are overtaken
        # before then and never need it.
        if new_best:
          pending_probes[k] = None          # overtaken: never reported
        if last:
          flush_probe(k)
          record["probe_accuracy"] = probe(seeds.take(host_state, k))
        elif new_best:
          pending_probes[k] = (epoch, seeds.take(host_state, k))
      if weigh_fusion:
        record["fusion"] = fusions[k]
        # The quantity ARL's estimators target, measured on the (large) test
        # split: a diagnostic of the estimators only, never used in training
        # or selection.
        record["test_true_class_variance"] = evaluation.true_class_variance(
            test)
      if new_best:
        run.update(best_val=val["accuracy"], best_epoch=epoch)
        best_predictions[k] = evaluation.predictions(val, test)
        if writer:
          lock.check_held()
          evaluation.save_predictions(seeds.dirs[k], best_predictions[k])
      if hook_records[k]:
        record["method"] = hook_records[k]
      if jump is not None:
        record["loss_jump"] = jump
      record["steps"] = len(step_metrics) + first
      record = workdir_lib.finite_or_none(record)
      history.append(record)
      timing = {"epoch": epoch, "time_s": time.perf_counter() - start,
                "train_time_s": train_s, "resumed_at_batch": first}
      if seeds.stacked:      # the seeds' shared time
        timing["num_seeds"] = seeds.n
      if writer:
        lock.check_held()
        with open(history_paths[k], "a") as f:
          f.write(workdir_lib.json_line(record))
        with open(timings_paths[k], "a") as f:
          f.write(workdir_lib.json_line(timing))
        if events[k] is not None:
          events[k].add(record)
      progress.epoch(record, seeds.seeds[k] if seeds.stacked else None)
    if method.has_epoch_hook:
      state = topology.put_state(new_state)
    meta["epoch"] = epoch
    saved = (epoch % config.checkpoint_every_epochs == 0
             or epoch == config.num_epochs)
    if saved:
      save(epoch, steps, None)
    if epoch < config.num_epochs and (signum := stop_requested(
        epoch * steps)):
      if not saved:
        save(epoch, steps, None)
      checkpoints.close()
      raise workdir_lib.Preempted(signum, f"the end of epoch {epoch}",
                                  workdir)
    if config.stop_after_epoch and epoch >= config.stop_after_epoch and (
        epoch < config.num_epochs):
      checkpoints.close()
      if not saved:
        raise ConfigError("stop_after_epoch must fall on a checkpoint epoch "
                          "(a multiple of checkpoint_every_epochs).")
      return {"stopped_after_epoch": epoch, "workdir": str(workdir)}
  checkpoints.close()
  for e in events:
    if e is not None:
      e.close()
  final_params = topology.host(state.params)
  reports = []
  for k in range(seeds.n):
    if writer and best_predictions[k] is not None:
      # A finished run's predictions.npz is the best epoch's, deleted or
      # damaged since or not: rewritten from the checkpoint's copy if it
      # differs.
      evaluation.ensure_predictions(seeds.dirs[k], best_predictions[k])
    report = _report(config, configs[k], runs[k], method, warmup_epochs,
                     initial_params[k], seeds.take(final_params, k), data,
                     topology, seeds)
    if writer:
      lock.check_held()
      _write_atomic(seeds.dirs[k] / "results.json",
                    json.dumps(report, indent=1))
      if config.plots:
        from experiments import plots
        plots.plot_run(runs[k]["history"], seeds.dirs[k],
                       title=f"{config.data.source} / {config.method.name} / "
                       f"seed {configs[k].seed}")
    reports.append(report)
  if not seeds.stacked:
    return reports[0]
  return {"method": config.method.name, "source": config.data.source,
          "num_seeds": seeds.n, "seeds": reports, "workdir": str(workdir)}


def _report(config, seed_config, run: dict, method, warmup_epochs: int,
            initial_params, final_params, data: Data, topology,
            seeds: _SeedAxis) -> dict:
  """One seed's results: test accuracy at its best validation epoch."""
  history = run["history"]
  best = next(h for h in history if h["epoch"] == run["best_epoch"])
  last = history[-1]
  report = {
      "method": config.method.name, "source": config.data.source,
      "seed": seed_config.seed, "epochs": config.num_epochs,
      "best_epoch": run["best_epoch"],
      "best_epoch_in_warmup": run["best_epoch"] <= warmup_epochs,
      "warmup_epochs": warmup_epochs,
      "modulation_window": method.modulation_window(),
      "val_accuracy_at_best": best["val_accuracy"],
      "test_accuracy_at_best_val": best["test_accuracy"],
      "test_macro_f1_at_best_val": best["test_macro_f1"],
      "test_accuracy_last": last["test_accuracy"],
      "test_macro_f1_last": last["test_macro_f1"],
      "dependency_ratio_last": last["dependency_ratio"],
      "inverse_variance_ratio_last": last["inverse_variance_ratio"],
      "a_last": last["a"],
      "encoder_distance": encoder_distance(initial_params, final_params,
                                           data.modalities),
      "parallel": topology.describe() + (
          f", {seeds.n} seeds in one program" if seeds.stacked else ""),
      **data.extra,
  }
  if "probe_accuracy" in best:
    report["probe_accuracy_at_best_val"] = best["probe_accuracy"]
    report["probe_accuracy_last"] = last["probe_accuracy"]
  if "fusion" in best:
    report["fusion"] = {}
    for name in last["fusion"]:
      # Each weighting selects its own epoch, on validation only.
      sel = max(history, key=lambda h, n=name: (h["fusion"][n]["val_accuracy"],
                                                -h["epoch"]))
      report["fusion"][name] = {
          "best_epoch": sel["epoch"],
          "test_accuracy_at_best_val": sel["fusion"][name]["test_accuracy"],
          "test_accuracy_last": last["fusion"][name]["test_accuracy"],
          "weights_at_best_val": sel["fusion"][name]["weights"]}
  return report
