"""Config checks of the trainer: every field before anything is written.

:func:`validate_config` raises :class:`ConfigError` naming the first problem
(unknown fields, values out of range, what the method and the data source
support); :func:`make_method` builds the configured method.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import ml_collections
import numpy as np

import arl_jax
from arl_jax import data as data_lib
from arl_jax.data import uci_multifeature
from arl_jax.models import fusion as fusion_lib
from experiments import distributed
from experiments.configs import default as default_config

AV_SOURCES = data_lib.AV_DATA_SETS
IN_MEMORY_SOURCES = ("synthetic", "imbalanced", "uci", "av_digits", "arrays")
# In-memory sources whose rows carry groups (data.heldout_by_group).
GROUPED_SOURCES = ("av_digits", "arrays")
SOURCES = IN_MEMORY_SOURCES + AV_SOURCES
FREE_FORM = {("data", "noise")}      # dict-valued fields whose keys are data
PROGRESS = ("auto", "bar", "lines", "none")
FUSION_NAMES = tuple(sorted(fusion_lib.FUSIONS))
OPTIMIZERS = ("sgd", "adamw", "lion")
PLACEMENTS = ("auto", "gradient", "update")


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is written."""


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
  if c.source == "arrays":
    if not c.path or not pathlib.Path(c.path).is_file():
      raise ConfigError("config.data.path must name the arrays file of the "
                        "'arrays' source (arl_jax.data.save_arrays); got "
                        f"{c.path!r}.")
    try:
      with np.load(c.path, allow_pickle=False) as z:
        keys = set(z.files)
    except Exception as e:     # any unreadable file: one line, not a trace
      raise ConfigError(f"config.data.path {c.path!r} is not a readable .npz "
                        f"file ({type(e).__name__}: {e}).") from None
    if c.heldout_by_group and "train.groups" not in keys:
      raise ConfigError(f"config.data.heldout_by_group needs groups, and "
                        f"{c.path!r} has none: save it with save_arrays(..., "
                        "groups=...).")
  if c.heldout_by_group and c.source not in GROUPED_SOURCES:
    raise ConfigError(f"config.data.heldout_by_group needs a source whose rows "
                      f"have groups ({list(GROUPED_SOURCES)}); "
                      f"{c.source!r} has none.")
  if c.heldout_by_group and not c.heldout_fraction > 0:
    raise ConfigError("config.data.heldout_by_group needs "
                      "config.data.heldout_fraction > 0.")
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
  _check_method_values(config, method)
  if config.seed_program not in distributed.SEED_PROGRAMS:
    raise ConfigError(f"config.seed_program must be one of "
                      f"{list(distributed.SEED_PROGRAMS)}; got "
                      f"{config.seed_program!r}.")
  if config.num_seeds > 1 and (config.parallel.mode != "jit"
                               or jax.process_count() > 1):
    raise ConfigError(
        f"config.num_seeds {config.num_seeds} trains the seeds as one program "
        "with jax.jit over one process's devices: use "
        "config.parallel.mode='jit' and one process (or num_seeds=1 per "
        "process).")
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
  gate = getattr(method, "gate_batch", 0)
  if (getattr(method, "gating", None) == "batch_entropy" and gate
      and config.eval_batch_size % gate):
    raise ConfigError(
        f"config.eval_batch_size {config.eval_batch_size} is not a multiple "
        f"of method.gate_batch {gate}: MLA's gate is computed per {gate} "
        "evaluation rows, so the evaluation batch must hold whole groups "
        f"(e.g. {max(gate, config.eval_batch_size // gate * gate)}).")
  if method.needs_heldout and not c.heldout_fraction > 0:
    raise ConfigError(f"method {config.method.name!r} with these fields needs "
                      "held-out rows: set config.data.heldout_fraction (e.g. "
                      "0.1).")


# Fields where +inf is a setting, not an accident (AGM's clamp: the AVE script).
_INFINITE_ALLOWED = frozenset({"clamp"})


def _check_method_values(config, method) -> None:
  """What a method's own constructor cannot see: non-finite numbers (a NaN
  or infinite temperature, gamma or alpha would otherwise stop the run with
  a divergence that blames the learning rate), the modalities a field names,
  and the model a method's option needs."""
  name = config.method.name
  for f in dataclasses.fields(method):
    v = getattr(method, f.name)
    values = v if isinstance(v, tuple) else (v,)
    for x in values:
      if not _is_number(x) or math.isfinite(x):
        continue
      if f.name in _INFINITE_ALLOWED and x == math.inf:
        continue
      raise ConfigError(f"config.method.{f.name} must be a finite number "
                        f"(method {name!r}); got {v!r}.")
  modalities = _source_modalities(config)
  reference = getattr(method, "reference", None)
  if reference is not None and reference not in modalities:
    raise ConfigError(f"config.method.reference {reference!r} is not one of "
                      f"the data's modalities {modalities}.")
  if getattr(method, "projection", "none") != "none" and (
      config.model.fusion != "shared"):
    raise ConfigError(
        f"config.method.projection {method.projection!r} projects the "
        "gradient of a head shared by the modalities: it needs "
        f"config.model.fusion='shared' (got {config.model.fusion!r}).")
  stop, every = config.stop_after_epoch, config.checkpoint_every_epochs
  if stop and stop < config.num_epochs and stop % every:
    raise ConfigError(
        f"config.stop_after_epoch {stop} must fall on a checkpoint epoch: a "
        f"multiple of config.checkpoint_every_epochs ({every}).")


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
               "checkpoint_every_epochs", "num_seeds"):
    at_least(name, 1)
  for name in ("seed", "warmup_epochs", "stop_after_epoch"):
    at_least(name, 0)
  _check(config.progress in PROGRESS, "progress", f"one of {list(PROGRESS)}",
         config.progress)
  boolean("plots", config.plots)
  boolean("tensorboard", config.tensorboard)
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
  boolean("optim.normalize_loss_weights", o.normalize_loss_weights)
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
  _check(config.model.encoder in ("mlp", "cnn"), "model.encoder",
         "'mlp' or 'cnn'", config.model.encoder)
  if config.model.encoder == "cnn" and c.source != "av_digits":
    raise ConfigError("config.model.encoder 'cnn' needs 2-D inputs: the "
                      "av_digits source (the audio-visual sources have their "
                      "own ResNets).")
  _check(len(c.audio_pool) == 2 and all(_is_int(v) and 1 <= v <= 8
                                         for v in c.audio_pool),
         "data.audio_pool", "two integers in [1, 8]", c.audio_pool)
  _check(_is_number(c.image_energy_removed) and 0 <= c.image_energy_removed < 1,
         "data.image_energy_removed", "in [0, 1)", c.image_energy_removed)
  for name in ("nonlinear", "actor_disjoint", "skip_invalid",
               "heldout_by_group"):
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
  if c.source == "av_digits":
    return ["audio", "image"]
  if c.source == "arrays":
    return data_lib.arrays.file_modalities(c.path)
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
