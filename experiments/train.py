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
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import shutil
import signal
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

import arl_jax
from arl_jax import data as data_lib
from arl_jax import fusion_weighting
from arl_jax import models
from arl_jax.data import uci_multifeature
from arl_jax.models import fusion as fusion_lib
from experiments import diagnostics
from experiments import distributed
from experiments import tensorboard
from experiments import workdir as workdir_lib
from experiments.configs import default as default_config

AV_SOURCES = ("crema_d", "kinetics_sounds", "ave")
IN_MEMORY_SOURCES = ("synthetic", "imbalanced", "uci")
SOURCES = IN_MEMORY_SOURCES + AV_SOURCES
FREE_FORM = {("data", "noise")}      # dict-valued fields whose keys are data
PROGRESS = ("auto", "bar", "lines", "none")
FUSION_NAMES = tuple(sorted(fusion_lib.FUSIONS))


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is written."""


# ------------------------------------------------------------------ config --

def _check_fields(config, reference, prefix=()):
  for key in config.keys():
    path = prefix + (key,)
    if key not in reference:
      raise ConfigError(f"unknown config field {'.'.join(path)!r}; known "
                        f"fields here: {sorted(reference.keys())}.")
    if path in FREE_FORM:
      continue
    if isinstance(reference[key], ml_collections.ConfigDict):
      _check_fields(config[key], reference[key], path)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first problem found."""
  _check_fields(config, default_config.get_config())
  if config.method.name not in arl_jax.method_names():
    raise ConfigError(f"unknown method {config.method.name!r}; known methods: "
                      f"{list(arl_jax.method_names())}.")
  if config.data.source not in SOURCES:
    raise ConfigError(f"unknown data source {config.data.source!r}; known: "
                      f"{list(SOURCES)}.")
  c = config.data
  if c.source == "imbalanced" and c.setting not in data_lib.IMBALANCE_SETTINGS:
    raise ConfigError(f"config.data.setting must be one of "
                      f"{sorted(data_lib.IMBALANCE_SETTINGS)}; got {c.setting!r}.")
  if not 0.0 <= c.heldout_fraction < 0.5:
    raise ConfigError("config.data.heldout_fraction must be in [0, 0.5); got "
                      f"{c.heldout_fraction}.")
  if c.source not in IN_MEMORY_SOURCES and (
      c.heldout_fraction or c.only_modality or config.diagnostics.linear_probe):
    raise ConfigError("data.heldout_fraction, data.only_modality and "
                      "diagnostics.linear_probe are implemented for the "
                      f"in-memory sources {list(IN_MEMORY_SOURCES)} only.")
  if c.only_modality and c.only_modality not in _source_modalities(config):
    raise ConfigError(f"config.data.only_modality {c.only_modality!r} is not "
                      f"one of {_source_modalities(config)}.")
  if config.data.source in AV_SOURCES:
    if not config.data.path:
      raise ConfigError(f"config.data.path is required for "
                        f"{config.data.source}: the folder of your local copy.")
    if not pathlib.Path(config.data.path).is_dir():
      raise ConfigError(f"config.data.path {config.data.path!r} does not "
                        "exist.")
    if config.data.augment not in ("host", "device", "auto"):
      raise ConfigError("config.data.augment must be 'host', 'device' or "
                        f"'auto'; got {config.data.augment!r}.")
  _check_values(config)
  if config.optim.name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name must be one of {list(OPTIMIZERS)}; "
                      f"got {config.optim.name!r}.")
  if config.optim.scale_placement not in PLACEMENTS:
    raise ConfigError("config.optim.scale_placement must be one of "
                      f"{list(PLACEMENTS)}; got {config.optim.scale_placement!r}.")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype must be float32 or bfloat16; got "
                      f"{config.model.dtype!r}.")
  method = make_method(config)   # method-specific checks (T > 0, ...)
  try:       # what the method supports of the data (PMR: two modalities)
    method.init_state(tuple(_source_modalities(config)))
  except ValueError as e:
    raise ConfigError(f"method {config.method.name!r}: {e}") from None
  if (method.has_epoch_hook and c.source in AV_SOURCES
      and jax.process_count() > 1):
    # Each process reads only its rows of an audio-visual split; the hook
    # needs every row in every process (features, model copies).
    raise ConfigError(f"method {config.method.name!r} reads the encoders' "
                      "features of the whole training and validation splits "
                      "and trains model copies after epochs: with an "
                      "audio-visual source that runs in one process only "
                      f"(this run has {jax.process_count()} processes).")
  if method.needs_heldout and not c.heldout_fraction > 0:
    raise ConfigError(f"method {config.method.name!r} with these fields needs "
                      "held-out rows: set config.data.heldout_fraction (e.g. "
                      "0.1).")


def _check(ok: bool, field: str, allowed: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field} must be {allowed}; got {value!r}.")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _check_values(config) -> None:
  """Every field's value against what it may be (one message per field)."""
  def at_least(field, low):
    v = config[field] if "." not in field else config[field.split(".")[0]][
        field.split(".")[1]]
    _check(_is_int(v) and v >= low, field, f"an integer >= {low}", v)

  def positive(field, v, upper=None, closed=True):
    ok = _is_number(v) and math.isfinite(v) and v > 0 and (
        upper is None or (v <= upper if closed else v < upper))
    rng = ("a finite number > 0" if upper is None else
           f"in (0, {upper}{']' if closed else ')'}")
    _check(ok, field, rng, v)

  def boolean(field, v):
    _check(isinstance(v, bool), field, "True or False", v)

  for name in ("batch_size", "num_epochs", "eval_batch_size",
               "checkpoint_every_epochs"):
    at_least(name, 1)
  for name in ("seed", "warmup_epochs", "stop_after_epoch"):
    at_least(name, 0)
  _check(config.progress in PROGRESS, "progress", f"one of {list(PROGRESS)}",
         config.progress)
  boolean("plots", config.plots)
  o = config.optim
  positive("optim.learning_rate", o.learning_rate)
  _check(_is_number(o.momentum) and 0 <= o.momentum < 1, "optim.momentum",
         "in [0, 1)", o.momentum)
  _check(_is_number(o.weight_decay) and math.isfinite(o.weight_decay)
         and o.weight_decay >= 0, "optim.weight_decay", "a finite number >= 0",
         o.weight_decay)
  positive("optim.clip_norm", o.clip_norm)
  positive("optim.decay_factor", o.decay_factor)
  _check(all(_is_int(e) and e >= 0 for e in o.decay_epochs),
         "optim.decay_epochs", "a tuple of integers >= 0", o.decay_epochs)
  boolean("optim.check_scales", o.check_scales)
  _check(config.model.fusion in FUSION_NAMES, "model.fusion",
         f"one of {list(FUSION_NAMES)}", config.model.fusion)
  _check(len(config.model.encoder_widths) > 0 and all(
      _is_int(w) and w >= 1 for w in config.model.encoder_widths),
         "model.encoder_widths", "a non-empty tuple of integers >= 1",
         config.model.encoder_widths)
  _check(config.parallel.mode in distributed.MODES, "parallel.mode",
         f"one of {list(distributed.MODES)}", config.parallel.mode)
  at_least("parallel.devices", 0)
  boolean("diagnostics.linear_probe", config.diagnostics.linear_probe)
  c = config.data
  for name in ("num_classes",):
    _check(_is_int(c[name]) and c[name] >= 2, f"data.{name}",
           "an integer >= 2", c[name])
  for name in ("dim", "num_frames", "image_size"):
    _check(_is_int(c[name]) and c[name] >= 1, f"data.{name}",
           "an integer >= 1", c[name])
  for name in ("read_threads", "num_workers", "split_seed"):
    _check(_is_int(c[name]) and c[name] >= 0, f"data.{name}",
           "an integer >= 0", c[name])
  _check(len(c.sizes) == 3 and all(_is_int(n) and n >= 1 for n in c.sizes),
         "data.sizes", "three integers >= 1 (train, validation, test rows)",
         c.sizes)
  for name in ("nonlinear", "actor_disjoint", "skip_invalid"):
    boolean(f"data.{name}", c[name])
  if c.source == "synthetic":
    _check(len(c.noise) >= 2, "data.noise",
           "a mapping of two or more modality names to sigma", dict(c.noise))
    for m, sigma in c.noise.items():
      positive(f"data.noise.{m}", sigma)
  if c.source == "uci":
    views = tuple(c.views)
    _check(len(views) >= 2 and len(set(views)) == len(views) and all(
        v in uci_multifeature.VIEWS for v in views), "data.views",
           f"two or more distinct views of {sorted(uci_multifeature.VIEWS)}",
           views)


def _source_modalities(config) -> list[str]:
  c = config.data
  if c.source == "synthetic":
    return sorted(c.noise)
  if c.source == "imbalanced":
    return sorted(data_lib.IMBALANCE_SETTINGS.get(c.setting, {}))
  if c.source == "uci":
    return sorted(c.views)
  return ["audio", "visual"]


def make_method(config) -> arl_jax.Method:
  """The registered method ``config.method.name`` with the fields it has.

  Fields left at ``None`` keep the method's default; fields the method does
  not have are ignored (so one config can switch methods).
  """
  name = config.method.name
  cls = arl_jax.methods.method_class(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in config.method.items()
            if k in fields and v is not None}
  try:
    return arl_jax.make_method(name, **kwargs)
  except ValueError as e:
    raise ConfigError(f"method {name!r}: {e}") from e


# -------------------------------------------------------------------- data --

@dataclasses.dataclass
class Data:
  modalities: tuple[str, ...]
  num_classes: int
  example: dict                           # a few inputs, for initialisation
  # (epoch, first batch) -> that epoch's batches from the given one on
  # (a resume mid-epoch starts where the run stopped).
  train: Callable[[int, int], Iterator[dict]]
  evaluate: dict[str, Callable[[], Iterator[dict]]]
  steps_per_epoch: int
  train_rows: int
  extra: dict
  # Traced into the jitted steps: (batch, rng) -> batch and batch -> batch.
  train_transform: Callable | None = None
  eval_transform: Callable | None = None
  # In-memory sources: the arrays (linear probes) and the held-out slice of
  # the training rows (never trained on; ARL's held-out estimators and the
  # fusion weights read it).
  splits: dict | None = None
  heldout: tuple | None = None
  # True when the pipeline already yields only this process's rows.
  sharded_by_process: bool = False
  # Audio-visual sources: the training split in evaluation mode (no
  # augmentation, every row once, a padded last batch with ``mask`` False),
  # what the epoch hooks' features of "train" read.
  train_eval: Callable[[], Iterator[dict]] | None = None


@functools.lru_cache(maxsize=4)
def _imbalanced(setting, num_classes, sizes, seed):
  # Cached: a comparison trains many runs on one problem in one process.
  return data_lib.make_imbalanced(setting, num_classes=num_classes,
                                  sizes=sizes, seed=seed)


def _split_heldout(x, y, fraction: float, seed: int):
  """The last ``fraction`` of a seeded permutation of the training rows."""
  n = len(y)
  order = np.random.default_rng([seed, 7]).permutation(n)
  k = int(round(fraction * n))
  keep, held = np.sort(order[:n - k]), np.sort(order[n - k:])
  take = lambda idx: ({m: v[idx] for m, v in x.items()}, y[idx])
  return take(keep), take(held)


def _with_heldout(batches, heldout, batch_size: int, seed: int, epoch: int):
  """Attaches a batch of held-out rows to every training batch (cycling)."""
  hx, hy = heldout
  stream = (b for e in range(1 << 30) for b in data_lib.iterate_batches(
      hx, hy, batch_size, shuffle=True, seed=seed + 1, epoch=epoch * 1000 + e,
      drop_last=len(hy) >= batch_size))
  for batch in batches:
    yield {**batch, "heldout": next(stream)}


def load_data(config, workdir: pathlib.Path, *, attach_heldout: bool = False,
              topology: distributed.Topology | None = None) -> Data:
  c = config.data
  if c.source in IN_MEMORY_SOURCES:
    extra = {}
    if c.source in ("synthetic", "imbalanced"):
      if c.source == "synthetic":
        problem = data_lib.make_linear_gaussian(
            dict(c.noise), num_classes=c.num_classes, dim=c.dim,
            sizes=tuple(c.sizes), seed=c.split_seed, nonlinear=c.nonlinear)
      else:
        problem = _imbalanced(c.setting, c.num_classes, tuple(c.sizes),
                              c.split_seed)
      splits, num_classes = dict(problem.splits), problem.num_classes
      extra = {"bayes_accuracy": problem.bayes_accuracy,
               "unimodal_bayes_accuracy": dict(problem.unimodal_bayes_accuracy)}
      if problem.bayes_true_class_variance is not None:
        extra["bayes_true_class_variance"] = dict(
            problem.bayes_true_class_variance)
    else:
      d = data_lib.load_uci_multifeature(tuple(c.views), seed=c.split_seed)
      splits, num_classes = dict(d.splits), d.num_classes
    if c.only_modality:
      # One modality trained alone: the same model with every other input
      # zeroed (their encoders see a constant).
      splits = {k: ({m: v if m == c.only_modality else np.zeros_like(v)
                     for m, v in x.items()}, y) for k, (x, y) in splits.items()}
      extra["only_modality"] = c.only_modality
    heldout = None
    if c.heldout_fraction > 0:
      splits["train"], heldout = _split_heldout(
          *splits["train"], c.heldout_fraction, c.split_seed)
    x, y = splits["train"]
    bs = config.batch_size

    def train(epoch, first=0):
      batches = data_lib.iterate_batches(x, y, bs, shuffle=True,
                                         seed=config.seed, epoch=epoch,
                                         drop_last=True)
      if attach_heldout:
        batches = _with_heldout(batches, heldout, bs, config.seed, epoch)
      return itertools.islice(batches, first, None)

    return Data(
        modalities=tuple(sorted(x)), num_classes=num_classes,
        example={m: v[:2] for m, v in x.items()}, train=train,
        evaluate={s: functools.partial(data_lib.iterate_batches, *splits[s],
                                       config.eval_batch_size)
                  for s in ("validation", "test")},
        steps_per_epoch=len(y) // bs, train_rows=len(y), extra=extra,
        splits=splits,
        heldout=heldout)
  kwargs = {"config": "actor_disjoint"} if (
      c.source == "crema_d" and c.actor_disjoint) else {}
  if c.skip_invalid:
    kwargs["skip_invalid"] = True
  prepared = pathlib.Path(c.prepared_dir or workdir / "data")
  builder = data_lib.prepare(c.source, c.path, prepared, **kwargs)
  src = data_lib.load_prepared(builder.data_dir)
  first = next(data_lib.av_batches(src["validation"], batch_size=2, train=False,
                                   num_frames=c.num_frames,
                                   image_size=c.image_size))
  augment = c.augment
  if augment == "auto":   # the crop/resize matmuls pay off on accelerators
    augment = "host" if jax.default_backend() == "cpu" else "device"
  shards = ({} if topology is None or topology.process_count == 1 else
            {"shard_index": topology.process_index,
             "shard_count": topology.process_count})
  av = functools.partial(data_lib.av_batches, num_frames=c.num_frames,
                         image_size=c.image_size, augment=augment,
                         read_threads=c.read_threads,
                         num_workers=c.num_workers, **shards)
  aug = data_lib.FrameAugmentation(image_size=c.image_size)
  on_device = augment == "device"
  return Data(
      modalities=("audio", "visual"),
      num_classes=builder.info.features["label"].num_classes,
      example=first["inputs"],
      train=lambda epoch, first=0: av(
          src["train"], batch_size=config.batch_size, train=True,
          seed=config.seed, epoch=epoch, first_batch=first),
      evaluate={s: functools.partial(av, src[s], batch_size=config.eval_batch_size,
                                     train=False)
                for s in ("validation", "test")},
      steps_per_epoch=len(src["train"]) // config.batch_size,
      train_rows=len(src["train"]),
      extra={"augment": augment},
      train_transform=aug.train if on_device else None,
      eval_transform=aug.eval if on_device else None,
      sharded_by_process=bool(shards),
      train_eval=functools.partial(av, src["train"],
                                   batch_size=config.eval_batch_size,
                                   train=False))


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
  return models.multiview_classifier(
      dims, data.num_classes, encoder_widths=tuple(config.model.encoder_widths),
      fusion=config.model.fusion, dtype=dtype)


OPTIMIZERS = ("sgd", "adamw", "lion")
PLACEMENTS = ("auto", "gradient", "update")


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


# ----------------------------------------------------------------- metrics --

def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int
             ) -> float:
  f1 = []
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    if tp + fp + fn == 0:
      continue
    f1.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1)) if f1 else 0.0


def evaluate(eval_step, state, batches, num_classes, *, logits: bool = False
             ) -> dict:
  """Exact metrics of a split (every row once); ``log_probs`` per row, and
  with ``logits`` the fused and unimodal logits too.

  ``eval_step(state, batch) -> host dict`` (the data-parallel step of
  :mod:`experiments.distributed`: sums over the global batch, per-row
  outputs of every row in order).
  """
  correct = count = 0.0
  uni: dict[str, float] = {}
  preds, labels, log_probs, fused, unimodal = [], [], [], [], []
  for batch in batches():
    out = eval_step(state, batch)
    correct += float(out["correct"])
    count += float(out["count"])
    for m, v in out["unimodal_correct"].items():
      uni[m] = uni.get(m, 0.0) + float(v)
    valid = np.asarray(out["valid"])
    preds.append(np.asarray(out["predictions"])[valid])
    labels.append(np.asarray(out["labels"])[valid])
    f = np.asarray(out["fused_logits"])[valid]
    log_probs.append(f - np.logaddexp.reduce(f, axis=-1, keepdims=True))
    if logits:
      fused.append(f)
      unimodal.append({m: np.asarray(v)[valid]
                       for m, v in out["unimodal_logits"].items()})
  p, y = np.concatenate(preds), np.concatenate(labels)
  result = {"accuracy": correct / max(count, 1.0),
            "macro_f1": macro_f1(p, y, num_classes), "count": int(count),
            "unimodal_accuracy": {m: v / max(count, 1.0)
                                  for m, v in uni.items()},
            "log_probs": np.concatenate(log_probs), "labels": y}
  if logits:
    result["fused_logits"] = np.concatenate(fused)
    result["unimodal_logits"] = {m: np.concatenate([u[m] for u in unimodal])
                                 for m in unimodal[0]}
  return result


def encoder_distance(initial, final, modalities) -> dict[str, float]:
  """``||theta_m(final) - theta_m(initial)||`` per encoder (how far it moved)."""
  labels = arl_jax.label_modalities(modalities)(initial)
  sq = dict.fromkeys(modalities, 0.0)
  for a, b, m in zip(jax.tree.leaves(initial), jax.tree.leaves(final),
                     jax.tree.leaves(labels)):
    if m in sq:
      sq[m] += float(np.sum((np.asarray(b, np.float64) - a) ** 2))
  return {m: float(np.sqrt(v)) for m, v in sq.items()}


def _ratio(a: float, b: float) -> float:
  return a / b if b else math.nan


def epoch_record(epoch, train, val, test, lr, modalities) -> dict:
  ref = modalities[-1]
  q, s = train["q"], train["s"]
  return {
      "epoch": epoch, "lr": float(lr),
      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
      "train_unimodal_accuracy": train["unimodal_accuracy"],
      "q": q, "s": s, "a": train["a"], "scale": train["scale"],
      "warmup": train["warmup"], "update_skipped": train["update_skipped"],
      # Fig. 3 of the paper: the dependency ratio s_m / s_ref against the
      # inverse-variance ratio q_m / q_ref (ref: the last modality).
      "dependency_ratio": {m: _ratio(s[m], s[ref]) for m in modalities
                           if m != ref},
      "inverse_variance_ratio": {m: _ratio(q[m], q[ref]) for m in modalities
                                 if m != ref},
      "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
      "val_unimodal_accuracy": val["unimodal_accuracy"],
      "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
      # Rows each evaluation counted (every row of the split exactly once).
      "val_count": val["count"], "test_count": test["count"],
  }


# -------------------------------------------------------------- resumption --

def _weighted_evaluation(eval_step, state, data: Data, val: dict,
                         test: dict, batch_size: int) -> dict:
  """Validation/test accuracy with fusion weights fitted on held-out rows.

  ``val`` and ``test`` are this epoch's evaluations with their logits; the
  weighted fused prediction is recomputed from them, not from the model.
  """
  hx, hy = data.heldout
  held = evaluate(eval_step, state, functools.partial(
      data_lib.iterate_batches, hx, hy, batch_size), data.num_classes,
      logits=True)
  weightings = diagnostics.fusion_weightings(held["fused_logits"],
                                             held["unimodal_logits"],
                                             held["labels"])
  out = {}
  for name, weights in weightings.items():
    acc = {}
    for split, r in (("val", val), ("test", test)):
      # p_0 + sum_m w_m (p_m - p_0), p_0 = (sum_m p_m - p_f) / (K - 1), on
      # the host (arl_jax.fusion_weighting.weighted_fusion_logits on device).
      uni = r["unimodal_logits"]
      bias = (sum(uni.values()) - r["fused_logits"]) / (len(uni) - 1)
      fused = bias + sum(weights[m] * (z - bias) for m, z in uni.items())
      acc[split] = float(np.mean(np.argmax(fused, -1) == r["labels"]))
    out[name] = {"weights": weights, "val_accuracy": acc["val"],
                 "test_accuracy": acc["test"]}
  return out


def _barrier(name: str) -> None:
  """Waits for every process (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


_write_atomic = workdir_lib.write_atomic


def _true_class_variance(r: dict) -> dict[str, float]:
  out = {}
  for m, z in r["unimodal_logits"].items():
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    out[m] = float(np.var(np.exp(logp[np.arange(len(r["labels"])),
                                      r["labels"]])))
  return out


def _save_predictions(workdir: pathlib.Path, val: dict, test: dict) -> None:
  """Validation and test log-probabilities of the best-validation epoch
  (late-fusion ensembles of runs are built from these)."""
  tmp = workdir / "predictions.tmp.npz"
  np.savez(tmp, **{f"{split}_{k}": r[k] for split, r in
                   (("validation", val), ("test", test))
                   for k in ("log_probs", "labels")})
  tmp.replace(workdir / "predictions.npz")


def _config_json(config) -> str:
  c = ml_collections.ConfigDict(config.to_dict())
  # Presentation-only fields may change between a run and its resumption.
  for key in ("progress", "plots", "stop_after_epoch"):
    c[key] = None
  return c.to_json(sort_keys=True)


def _check_workdir(config, workdir: pathlib.Path) -> None:
  saved = workdir / "config.json"
  ckpt = workdir / "checkpoints"
  if saved.exists():
    if json.loads(saved.read_text()) != json.loads(_config_json(config)):
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
    self.bar = None
    self.lines = mode in ("auto", "lines") and not interactive
    if interactive:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

  def step(self, metrics, i):
    if self.bar is not None:
      self.bar.update(1)
      if i % 10 == 0:
        self.bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                             acc=f"{float(metrics['accuracy']):.3f}")

  def epoch(self, record):
    if self.bar is not None:
      self.bar.close()
    if self.lines or self.bar is not None:
      print(f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
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
  created = not workdir.exists()
  lock = _lock(workdir, topology.is_writer)
  # One process cannot stop a collective run alone: several processes stop
  # on SIGTERM through JAX's preemption service (every process saves at the
  # same step); one process handles SIGTERM and Ctrl-C itself.
  signals = () if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  try:
    with workdir_lib.Preemption(signals) as preempt:
      return _train_locked(config, workdir, topology, preempt)
  except ConfigError:
    if created and topology.is_writer and all(
        p.name == ".lock" for p in workdir.iterdir()):
      lock.release()
      shutil.rmtree(workdir)      # refused before writing: leave no trace
    raise
  finally:
    lock.release()


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _event_log(workdir: pathlib.Path, history: list[dict]):
  """TensorBoard events of the record (None without tensorboardX)."""
  try:
    return tensorboard.EventLog(workdir, history)
  except ImportError:
    _log("tensorboardX is not installed: no TensorBoard events (pip install "
         "'.[experiments]'); metrics.jsonl has every figure.")
    return None


def _read_log(path: pathlib.Path, last_epoch: int) -> list[dict]:
  """Records of epochs <= ``last_epoch`` from a JSONL log (a log, not the
  run's record: a torn line -- what a kill mid-write leaves -- is dropped, a
  missing file is empty)."""
  out = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("epoch", 0) <= last_epoch:
        out.append(record)
  return out


class _Checkpoints:
  """orbax steps (numbered by training steps done) with a SHA-256 record
  per step, verified before a restore."""

  def __init__(self, workdir: pathlib.Path, topology):
    self.dir = (workdir / "checkpoints").absolute()
    self.topology = topology
    if topology.is_writer:
      workdir_lib.set_aside_unverified(self.dir, log=_log)
    _barrier("checkpoints verified")
    self._open()

  def _open(self):
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False))

  def restore(self, state):
    """(state, meta, partial metrics or None) of the newest step that
    restores; steps that do not are set aside. ``None`` when there is none."""
    while (step := self.manager.latest_step()) is not None:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        items = {"state": ocp.args.StandardRestore(
            self.topology.checkpointable(state))}
        if meta.get("position"):
          items["partial"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step,
                                        args=ocp.args.Composite(**items))
      except Exception as e:       # noqa: BLE001 -- any unreadable step
        if jax.process_count() > 1:
          raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        self.manager.close()
        workdir_lib.set_aside(self.dir, step, "orbax cannot restore it ("
                              f"{type(e).__name__}: {first})", log=_log)
        self._open()
        continue
      partial = restored["partial"] if meta.get("position") else None
      return (self.topology.from_checkpoint(restored["state"]), dict(meta),
              partial)
    return None

  def save(self, step: int, state, meta: dict, partial=None) -> None:
    items = {"state": ocp.args.StandardSave(
                 self.topology.checkpointable(state)),
             "meta": ocp.args.JsonSave(meta)}
    if partial is not None:
      items["partial"] = ocp.args.StandardSave(partial)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    _barrier(f"checkpoint {step} saved")
    if self.topology.is_writer:
      workdir_lib.write_checksums(self.dir / str(step))
    _barrier(f"checkpoint {step} recorded")

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _split_features(feature_fn, host_state, data: Data, split: str,
                    chunk: int = 1024, *, eval_transform=None):
  """``({modality: features}, labels)`` of every row of ``split``, in
  evaluation mode: ``"train"`` or ``"validation"``, never the test split.

  In-memory sources: the split's arrays, ``chunk`` rows at a time.
  Audio-visual sources: the split's evaluation batches (``"train"``:
  ``data.train_eval``, no augmentation), each through ``eval_transform``
  (``data.eval_transform``, jitted) where given, padding rows dropped.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"an epoch hook reads the 'train' or 'validation' split, "
                     f"never {split!r}.")
  if data.splits is not None:
    x, y = data.splits[split]
    parts = [jax.device_get(feature_fn(host_state, {
        m: v[i:i + chunk] for m, v in x.items()}))
             for i in range(0, len(y), chunk)]
    return {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}, y
  batches = data.train_eval if split == "train" else data.evaluate[split]
  parts, labels = [], []
  for batch in batches():
    inputs = (batch if eval_transform is None
              else eval_transform(batch))["inputs"]
    keep = np.asarray(batch["mask"], bool)
    feats = jax.device_get(feature_fn(host_state, inputs))
    parts.append({m: np.asarray(v)[keep] for m, v in feats.items()})
    labels.append(np.asarray(batch["labels"])[keep])
  return ({m: np.concatenate([p[m] for p in parts]) for m in parts[0]},
          np.concatenate(labels))


def _fit_copy(state, keep, epochs, *, apply_fn, tx, data: Data, config,
              compiled: dict):
  """Trains a copy of ``state`` (fresh optimiser state, one device) on CE of
  the fused logits with inputs outside ``keep`` zeroed; returns per
  copy-epoch sums of per-batch mean training and validation losses.
  Reads ``data.train`` and the validation batches (with the data's device
  transforms, if any; every row in this process: one process only for a
  source sharded by process). ``compiled`` keeps each ``keep``'s jitted
  steps for the next call."""
  keep = tuple(keep)
  if keep not in compiled:
    def zeroed(params, model_state, inputs, *, train, rng):
      x = {m: v if m in keep else jnp.zeros_like(v) for m, v in inputs.items()}
      return apply_fn(params, model_state, x, train=train, rng=rng)
    compiled[keep] = (
        jax.jit(arl_jax.make_train_step(
            zeroed, tx, arl_jax.Method(), check_tx=False,
            batch_transform=data.train_transform)),
        jax.jit(arl_jax.make_eval_step(zeroed,
                                       batch_transform=data.eval_transform)))
  step, evaluate_fn = compiled[keep]
  copy = state.replace(opt_state=tx.init(state.params))
  train_sums, val_sums = [], []
  for j in range(epochs):
    losses = []
    for batch in data.train(100_000 + j):      # orders the run never uses
      batch = {k: v for k, v in batch.items() if k != "heldout"}
      copy, metrics = step(copy, batch)
      losses.append(metrics["loss"])
    train_sums.append(float(np.sum(jax.device_get(losses))))
    val = 0.0
    for batch in data.evaluate["validation"]():
      out = jax.device_get(evaluate_fn(copy, batch))
      valid = np.asarray(out["valid"])
      z = np.asarray(out["fused_logits"], np.float64)[valid]
      y = np.asarray(out["labels"])[valid]
      logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
      val += float(-np.mean(logp[np.arange(len(y)), y])) if len(y) else 0.0
    val_sums.append(val)
  return train_sums, val_sums


def _host_metrics(step_metrics: list, to_host) -> dict:
  # Stacked on the device first: one transfer per metric, not per step.
  return to_host(jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics))


def _mean(partial, stacked) -> dict:
  """Per-metric means over the epoch's steps, those before a resume first."""
  parts = [t for t in (partial, stacked) if t is not None]
  whole = jax.tree.map(lambda *xs: np.concatenate(
      [np.asarray(x) for x in xs]), *parts)
  return jax.tree.map(lambda x: float(np.mean(x)), whole)


def _train_locked(config, workdir: pathlib.Path, topology,
                  preempt: workdir_lib.Preemption) -> dict:
  writer = topology.is_writer
  if workdir.exists():
    _check_workdir(config, workdir)
  _barrier("workdir checked")
  method = make_method(config)
  if writer:
    data = load_data(config, workdir, attach_heldout=method.needs_heldout,
                     topology=topology)
  _barrier("data prepared")       # one process prepares a TFDS data set
  if not writer:
    data = load_data(config, workdir, attach_heldout=method.needs_heldout,
                     topology=topology)
  if data.steps_per_epoch < 1:
    raise ConfigError(
        f"config.batch_size {config.batch_size} is larger than the "
        f"{data.train_rows} training rows: choose at most {data.train_rows}.")
  if writer:
    _write_atomic(workdir / "config.json", _config_json(config))

  if "batches_per_epoch" in {f.name for f in dataclasses.fields(method)}:
    # MLA's alpha_t counts batches within an epoch.
    method = dataclasses.replace(method,
                                 batches_per_epoch=data.steps_per_epoch)
  model = build_model(config, data)
  params, model_state = models.init_model(model, jax.random.PRNGKey(config.seed),
                                          data.example)
  tx, schedule = make_optimizer(config, data)
  initial_params = jax.device_get(params)
  state = arl_jax.TrainState.create(params=params, tx=tx,
                                    model_state=model_state,
                                    rng=jax.random.PRNGKey(config.seed + 1),
                                    method=method, modalities=data.modalities)
  apply_fn = models.make_apply_fn(model, with_features=method.needs_features)
  train_step = topology.train_step(lambda axis_name: arl_jax.make_train_step(
      apply_fn, tx, method,
      warmup_steps=config.warmup_epochs * data.steps_per_epoch,
      batch_transform=data.train_transform,
      check_tx=config.optim.check_scales, axis_name=axis_name))
  run_eval = topology.eval_step(make_step=lambda axis_name: (
      arl_jax.make_eval_step(apply_fn, batch_transform=data.eval_transform,
                             method=method, axis_name=axis_name)))
  local = (lambda b: b) if data.sharded_by_process else topology.local_part
  eval_step = lambda st, batch, **kw: run_eval(st, local(batch), **kw)
  weigh_fusion = (data.heldout is not None
                  and config.model.fusion in fusion_weighting.ADDITIVE_FUSIONS)
  # The encoders' evaluation-mode features: linear probes, epoch hooks.
  feature_fn = jax.jit(lambda st, x: model.apply(
      {"params": st.params, **st.model_state}, x, train=False,
      features_only=True))
  features = feature_fn if config.diagnostics.linear_probe else None
  fit_copy = functools.partial(_fit_copy, apply_fn=apply_fn, tx=tx,
                               data=data, config=config, compiled={})
  hook_transform = (jax.jit(data.eval_transform) if data.eval_transform
                    else None)

  def epoch_context(host_state):
    return arl_jax.EpochContext(
        modalities=data.modalities, num_classes=data.num_classes,
        features=functools.partial(_split_features, feature_fn, host_state,
                                   data, eval_transform=hook_transform),
        seed=config.seed, fit_copy=fit_copy)

  if method.has_epoch_hook:
    # "Epoch 0": before training (PMR's first prototypes, G-Blending's first
    # weights). Also when resuming: the checkpoint's state (which replaces
    # this one) is restored into this structure (G-Blending then repeats its
    # first estimation, deterministically, for nothing).
    state, _ = method.epoch_end(0, state, epoch_context(
        jax.device_get(state)))
  state = topology.put_state(state)

  checkpoints = _Checkpoints(workdir, topology)
  # The run's whole record lives in the checkpoint: metrics.jsonl and
  # timings.jsonl are logs rewritten from it, never read to resume.
  meta = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "history": [],
          "position": None}
  partial = None
  restored = checkpoints.restore(state)
  if restored is not None:
    state, saved_meta, partial = restored
    meta.update(saved_meta)
    if "history" not in saved_meta:      # written before the record moved
      meta["history"] = _read_log(workdir / "metrics.jsonl", meta["epoch"])
  history = meta["history"]
  history_path = workdir / "metrics.jsonl"
  timings_path = workdir / "timings.jsonl"
  _barrier("state restored")
  events = None
  if writer:
    _write_atomic(history_path,
                  "".join(workdir_lib.json_line(h) for h in history))
    _write_atomic(timings_path, "".join(
        workdir_lib.json_line(t)
        for t in _read_log(timings_path, meta["epoch"])))
    events = _event_log(workdir, history)

  steps = data.steps_per_epoch
  position = meta.pop("position") or {"epoch": meta["epoch"] + 1, "batch": 0}
  multi = jax.process_count() > 1

  def stop_requested(done: int) -> int:
    if multi:
      from jax.experimental import multihost_utils
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(
          done) else 0
    return preempt.requested

  def save(epoch: int, batch: int, step_metrics) -> None:
    """Checkpoint after ``batch`` of the ``steps`` batches of ``epoch``;
    mid-epoch, with the epoch's step metrics so far."""
    mid = batch < steps
    stacked = None
    if mid:
      parts = [t for t in (partial, _host_metrics(step_metrics,
                                                  topology.to_numpy))
               if t is not None]
      stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    checkpoints.save((epoch - 1) * steps + batch, state,
                     {**meta, "position": ({"epoch": epoch, "batch": batch}
                                           if mid else None)}, stacked)

  for epoch in range(position["epoch"], config.num_epochs + 1):
    start = time.perf_counter()
    first = position["batch"] if epoch == position["epoch"] else 0
    if epoch != position["epoch"]:
      partial = None
    progress = _Progress(config.progress if writer else "none", steps,
                         f"epoch {epoch}/{config.num_epochs}")
    step_metrics = []
    for i, batch in enumerate(data.train(epoch, first), first):
      state, metrics = train_step(state, topology.put_batch(local(batch)))
      step_metrics.append(metrics)
      progress.step(metrics, i)
      if i + 1 < steps and (signum := stop_requested(
          (epoch - 1) * steps + i + 1)):
        save(epoch, i + 1, step_metrics)
        checkpoints.close()
        raise workdir_lib.Preempted(
            signum, f"batch {i + 1} of {steps} of epoch {epoch}", workdir)
    train = _mean(partial, _host_metrics(step_metrics, topology.to_numpy)
                  if step_metrics else None)
    train_s = time.perf_counter() - start   # the steps and the pipeline
    if not np.isfinite(train["loss"]):
      checkpoints.close()
      raise TrainingDiverged(
          f"training diverged in epoch {epoch}: the mean training loss is "
          f"{train['loss']} (config.optim.learning_rate = "
          f"{config.optim.learning_rate}); nothing of this epoch was saved.")
    val = evaluate(eval_step, state, data.evaluate["validation"],
                   data.num_classes, logits=weigh_fusion)
    test = evaluate(eval_step, state, data.evaluate["test"],
                    data.num_classes, logits=weigh_fusion)
    step_count = int(topology.host(state.step))
    record = epoch_record(epoch, train, val, test,
                          schedule(step_count - 1), data.modalities)
    new_best = val["accuracy"] > meta["best_val"]
    if features is not None and (new_best or epoch == config.num_epochs):
      # Only where it is reported: the selected epoch and the last one.
      record["probe_accuracy"] = diagnostics.linear_probe_accuracy(
          functools.partial(features, topology.host(state)), data.splits,
          data.num_classes, data.modalities)
    if weigh_fusion:
      record["fusion"] = _weighted_evaluation(eval_step, state, data, val,
                                              test, config.eval_batch_size)
      # The quantity ARL's estimators target, measured on the (large) test
      # split: a diagnostic of the estimators only, never used in training
      # or selection.
      record["test_true_class_variance"] = _true_class_variance(test)
    if new_best:
      meta.update(best_val=val["accuracy"], best_epoch=epoch)
      if writer:
        _save_predictions(workdir, val, test)
    if method.has_epoch_hook:
      # Outside jit, after the epoch's evaluation; what it changes is in the
      # checkpoint below.
      host_state = topology.host(state)     # one transfer, read by both
      host_state, hook_record = method.epoch_end(epoch, host_state,
                                                 epoch_context(host_state))
      state = topology.put_state(host_state)
      if hook_record:
        record["method"] = hook_record
    record["steps"] = len(step_metrics) + first
    record = workdir_lib.finite_or_none(record)
    meta["epoch"] = epoch
    history.append(record)
    timing = {"epoch": epoch, "time_s": time.perf_counter() - start,
              "train_time_s": train_s, "resumed_at_batch": first}
    if writer:
      with open(history_path, "a") as f:
        f.write(workdir_lib.json_line(record))
      with open(timings_path, "a") as f:
        f.write(workdir_lib.json_line(timing))
      if events is not None:
        events.add(record)
    progress.epoch(record)
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
  if events is not None:
    events.close()
  final_params = topology.host(state.params)

  best = next(h for h in history if h["epoch"] == meta["best_epoch"])
  last = history[-1]
  report = {
      "method": config.method.name, "source": config.data.source,
      "seed": config.seed, "epochs": config.num_epochs,
      "best_epoch": meta["best_epoch"],
      "best_epoch_in_warmup": meta["best_epoch"] <= config.warmup_epochs,
      "warmup_epochs": config.warmup_epochs,
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
      "parallel": topology.describe(),
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
  if not writer:
    return report
  _write_atomic(workdir / "results.json", json.dumps(report, indent=1))
  if config.plots:
    from experiments import plots
    plots.plot_run(history, workdir, title=f"{config.data.source} / "
                   f"{config.method.name} / seed {config.seed}")
  return report
