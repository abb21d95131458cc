"""The trainer's data: :func:`load_data` -> :class:`Data`.

In-memory sources (synthetic, imbalanced, UCI) are arrays batched on the host
(an optional held-out slice of the training rows); audio-visual sources are
prepared once (TFDS) and read by the grain pipeline of
:mod:`arl_jax.data.av_pipeline`, with their augmentation on the host or on
the device.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
from collections.abc import Callable
from collections.abc import Iterator

import jax
import numpy as np

from arl_jax import data as data_lib
from arl_jax.data import av_digits
from arl_jax.data import splits as splits_lib
from experiments import distributed
from experiments.config_checks import IN_MEMORY_SOURCES


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
  # Traced into the jitted steps first (their ``preprocess``): (batch, rng)
  # -> batch and batch -> batch (the device augmentation).
  train_preprocess: Callable | None = None
  eval_preprocess: Callable | None = None
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


@functools.lru_cache(maxsize=2)
def _av_digits(seed, image_energy_removed, prepared_dir, fsdd_path,
               audio_pool):
  return av_digits.load_audio_visual_digits(
      seed=seed, image_energy_removed=image_energy_removed,
      prepared_dir=prepared_dir or None, fsdd_root=fsdd_path or None,
      audio_pool=audio_pool)


def _split_heldout(x, y, fraction: float, seed: int, groups=None):
  """Held-out rows of the training split: the last ``fraction`` of a seeded
  permutation, or (``groups`` given) whole groups, about ``fraction``.
  Returns ``(kept, held-out, held-out row indices)``."""
  n = len(y)
  if groups is not None:
    keep, held = splits_lib.group_holdout(groups, fraction, seed)
  else:
    order = np.random.default_rng([seed, 7]).permutation(n)
    k = int(round(fraction * n))
    keep, held = np.sort(order[:n - k]), np.sort(order[n - k:])
  take = lambda idx: ({m: v[idx] for m, v in x.items()}, y[idx])
  return take(keep), take(held), held


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
    extra, groups = {}, None
    if c.source in ("synthetic", "imbalanced"):
      if c.source == "synthetic":
        make = (data_lib.make_nonlinear_gaussian if c.nonlinear
                else data_lib.make_linear_gaussian)
        problem = make(dict(c.noise), num_classes=c.num_classes, dim=c.dim,
                       sizes=tuple(c.sizes), seed=c.split_seed)
      else:
        problem = _imbalanced(c.setting, c.num_classes, tuple(c.sizes),
                              c.split_seed)
      splits, num_classes = dict(problem.splits), problem.num_classes
      extra = {"bayes_accuracy": problem.bayes_accuracy,
               "unimodal_bayes_accuracy": dict(problem.unimodal_bayes_accuracy)}
      if problem.bayes_true_class_variance is not None:
        extra["bayes_true_class_variance"] = dict(
            problem.bayes_true_class_variance)
    elif c.source == "av_digits":
      d = _av_digits(c.split_seed, float(c.image_energy_removed),
                     c.prepared_dir, c.fsdd_path, tuple(c.audio_pool))
      splits, num_classes, groups = dict(d.splits), d.num_classes, d.groups
      extra = {"speakers": {s: sorted(set(g)) for s, g in groups.items()},
               "input_shapes": av_digits.input_shapes(tuple(c.audio_pool)),
               "cnn_pool": dict(av_digits.CNN_POOL)}
    elif c.source == "arrays":
      d = data_lib.load_arrays(c.path)
      splits, num_classes, groups = dict(d.splits), d.num_classes, d.groups
      extra = {"arrays_file": str(c.path), "arrays_sha256": d.sha256}
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
      splits["train"], heldout, held = _split_heldout(
          *splits["train"], c.heldout_fraction, c.split_seed,
          groups["train"] if c.heldout_by_group else None)
      if c.heldout_by_group:
        extra["heldout_groups" if c.source == "arrays" else
              "heldout_speakers"] = sorted(set(groups["train"][held]))
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
      train_preprocess=aug.train if on_device else None,
      eval_preprocess=aug.eval if on_device else None,
      sharded_by_process=bool(shards),
      train_eval=functools.partial(av, src["train"],
                                   batch_size=config.eval_batch_size,
                                   train=False))
