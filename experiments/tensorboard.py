"""TensorBoard event files beside ``metrics.jsonl``.

:class:`EventLog` writes each epoch's record as scalars into
``workdir/tensorboard/`` (``tensorboard --logdir runs/``): nested entries
become tags joined by ``/`` (``train/a/audio``), booleans and non-numbers are
skipped, the step is the epoch. Like ``metrics.jsonl`` it is a view of the
run's record, rewritten from the checkpoint on every start: a resumed run's
events hold each epoch once, however often it was interrupted.

:func:`read_scalars` reads them back (``{tag: [(step, value), ...]}``) with
no TensorFlow: event files are TFRecords of ``Event`` protocol buffers.
"""

from __future__ import annotations

import math
import pathlib
import struct
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

DIRNAME = "tensorboard"
# Train-step metrics and evaluation figures go under these prefixes.
_PREFIX = {"train_": "train/", "val_": "validation/", "test_": "test/"}


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """The finite numbers of an epoch record, keyed by ``/``-joined tags."""
  out: dict[str, float] = {}
  for key, value in record.items():
    if key == "epoch" and not prefix:
      continue
    tag = key
    if not prefix:
      for start, folder in _PREFIX.items():
        if key.startswith(start):
          tag = folder + key[len(start):]
          break
    tag = prefix + tag
    if isinstance(value, Mapping):
      out.update(scalars(value, tag + "/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      if math.isfinite(value):
        out[tag] = float(value)
  return out


class EventLog:
  """Epoch records as TensorBoard scalars in ``workdir/tensorboard/``."""

  def __init__(self, workdir: pathlib.Path, history: Iterable[Mapping]):
    from tensorboardX import SummaryWriter
    self.dir = pathlib.Path(workdir) / DIRNAME
    if self.dir.exists():        # a view of the record: rewritten whole
      for old in self.dir.glob("events.out.tfevents.*"):
        old.unlink()
    self._writer = SummaryWriter(logdir=str(self.dir), flush_secs=30)
    for record in history:
      self.add(record, flush=False)
    self._writer.flush()

  def add(self, record: Mapping[str, Any], flush: bool = True) -> None:
    step = int(record["epoch"])
    for tag, value in scalars(record).items():
      self._writer.add_scalar(tag, value, global_step=step)
    if flush:
      self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _records(path: pathlib.Path):
  data = path.read_bytes()
  at = 0
  while at + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    start = at + 12
    if start + length + 4 > len(data):
      return                     # a record still being written
    yield data[start:start + length]
    at = start + length + 4


def read_scalars(logdir: pathlib.Path | str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the event files in ``logdir``: ``{tag: [(step, value)]}``
  in the order written (lengths are read, CRCs are not checked)."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    for raw in _records(path):
      event = event_pb2.Event.FromString(raw)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step,
                                                value.simple_value))
  return out
