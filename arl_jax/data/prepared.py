"""Prepared data sets: the storage format the builders write and its reader.

:func:`store_uncompressed` rewrites TFDS's array_record shards without
compression (random reads are 4x faster); :func:`load_prepared` reads a
prepared data set back without TensorFlow, each split a random-access
:class:`PreparedSource` whose read errors name the damaged file.
"""

from __future__ import annotations

import bisect
import itertools
import os
import pathlib

import numpy as np

from arl_jax.data.layouts import DataError

try:  # TFDS is an optional dependency (the `data` extra).
  import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover
  tfds = None


_UNCOMPRESSED_MARK = ".records_uncompressed"


def store_uncompressed(path: str | os.PathLike) -> None:
  """Rewrites a prepared data set's array_record shards without compression.

  TFDS writes array_record with the format's default (brotli) compression.
  The records here are float32 spectrograms and JPEGs, both close to
  incompressible (about 10% smaller), yet decompressing costs ~0.3 ms per
  random read, as much as the rest of reading a sample. Each shard is
  rewritten record by record in the same order (to a temporary file, then
  renamed), so TFDS reads it unchanged; a marker file makes this a no-op the
  second time.
  """
  from array_record.python import array_record_module as ar
  path = pathlib.Path(path)
  if (path / _UNCOMPRESSED_MARK).exists():
    return
  for shard in sorted(path.glob("*.array_record-*")):
    if shard.name.endswith(".tmp"):
      continue
    reader = ar.ArrayRecordReader(os.fspath(shard))
    tmp = shard.with_name(shard.name + ".tmp")
    writer = ar.ArrayRecordWriter(os.fspath(tmp), "group_size:1,uncompressed")
    try:
      for start in range(0, reader.num_records(), 256):
        stop = min(start + 256, reader.num_records())
        for record in reader.read(list(range(start, stop))):
          writer.write(record)
    finally:
      writer.close()
      reader.close()
    os.replace(tmp, shard)
  (path / _UNCOMPRESSED_MARK).write_text("group_size:1,uncompressed\n")


def frame_canvas(source) -> tuple[int, int]:
  """(height, width) of the largest stored frame of a prepared source."""
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None) or {}
  hw = metadata.get("frame_hw_max")
  if not hw:
    raise DataError(
        "this prepared data set does not record its largest frame "
        "(metadata frame_hw_max, builder version >= 1.1.0): prepare it again "
        "with this version of arl_jax, or pass canvas=(height, width).")
  return int(hw[0]), int(hw[1])


def _shards(dataset_info, split) -> list:
  """TFDS's file instructions of a split: its files and their record counts."""
  return list(dataset_info.splits[split].file_instructions)


def _damaged(filename, version_dir, error) -> DataError:
  return DataError(
      f"prepared data file {filename} is damaged or unreadable ({error}). "
      f"Delete the prepared data set {version_dir} and prepare it again "
      "(arl_jax.data.prepare, or rerun the training, which prepares it).")


def _check_shards(dataset_info, version_dir) -> None:
  """Each split's files exist, open and hold the records TFDS lists.

  Cheap (an array_record file's index is read, not its records): catches a
  missing or cut file up front; damage inside a record is caught when it is
  read (:class:`_NamedReads`).
  """
  from array_record.python import array_record_module as ar
  for split in dataset_info.splits:
    for shard in _shards(dataset_info, split):
      filename = os.fspath(shard.filename)
      try:
        reader = ar.ArrayRecordReader(filename)
        try:
          count = reader.num_records()
        finally:
          reader.close()
      except Exception as e:  # riegeli raises RuntimeError/OSError/ValueError
        raise _damaged(filename, version_dir, e) from None
      if count != shard.examples_in_shard:
        raise _damaged(filename, version_dir,
                       f"{count} records, {shard.examples_in_shard} expected")


class _NamedReads:
  """A TFDS data source whose read errors name the damaged file.

  The array_record reader reports damage (e.g. "chunk data hash mismatch")
  without the file; this finds the split's file holding the record and
  raises :class:`DataError` naming it and what to do. The message holds the
  reader's own error (``from None``: one exception, also through grain).
  """

  def __init__(self, source, dataset_info, split):
    self._source, self._len = source, len(source)
    shards = _shards(dataset_info, split)
    self._files = [os.fspath(s.filename) for s in shards]
    self._ends = list(itertools.accumulate(s.take for s in shards))
    self._dir = dataset_info.data_dir

  def __len__(self) -> int:
    return self._len

  def _error(self, i, e) -> DataError:
    k = min(bisect.bisect_right(self._ends, int(i)), len(self._files) - 1)
    return _damaged(self._files[k], self._dir, f"record {i}: {e}")

  def __getitem__(self, i):
    if not 0 <= i.__index__() < self._len:
      raise IndexError(f"record {i} of {self._len}")
    try:
      return self._source[i]
    except Exception as e:
      raise self._error(i, e) from None

  def __getitems__(self, keys):
    try:
      return self._source.__getitems__(keys)
    except Exception:   # which record: read them one at a time
      return [self[k] for k in keys]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __getattr__(self, name):   # dataset_info, split, ... of the source
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._source, name)

  def __repr__(self) -> str:
    return repr(self._source)


class PreparedSource:
  """One split of a prepared data set, read record by record (random access).

  ``source[i]`` is ``{"audio": float32 [257, T], "frames": [JPEG bytes, ...],
  "label": int, "clip_id": bytes}``. Records are read as raw bytes
  (``DeserializeMethod.RAW_BYTES``, a public TFDS option) and the four
  features taken straight from the ``tf.train.Example`` proto: the same
  values TFDS's own decoding gives (tested), for ~20 us instead of ~0.4 ms
  per record of generic per-feature Python. ``dataset_info`` is the TFDS
  ``DatasetInfo``. A damaged file raises :class:`DataError` naming it.
  """

  def __init__(self, raw_source, dataset_info, split=None):
    split = split if split is not None else raw_source.split
    self._raw = _NamedReads(raw_source, dataset_info, split)
    self.dataset_info = dataset_info
    self._audio_shape = tuple(dataset_info.features["audio"].shape)

  @staticmethod
  def _parse_proto(record: bytes):
    from tensorflow_datasets.proto import tf_example_pb2
    return tf_example_pb2.Example.FromString(record)

  def __len__(self) -> int:
    return len(self._raw)

  def _parse(self, record: bytes) -> dict:
    f = self._parse_proto(record).features.feature
    audio = np.frombuffer(f["audio"].bytes_list.value[0], np.float32)
    return {"audio": audio.reshape(self._audio_shape),
            "frames": list(f["frames"].bytes_list.value),
            "label": int(f["label"].int64_list.value[0]),
            "clip_id": f["clip_id"].bytes_list.value[0]}

  def __getitem__(self, i) -> dict:
    return self._parse(self._raw[i])

  def __getitems__(self, keys) -> list[dict]:
    return [self._parse(r) for r in self._raw.__getitems__(keys)]

  def __repr__(self) -> str:
    return (f"PreparedSource({self.dataset_info.name}, {len(self)} records, "
            f"{self.dataset_info.data_dir})")


_FEATURES = ("audio", "clip_id", "frames", "label")


def load_prepared(path: str | os.PathLike, *, decode_frames: bool = False
                  ) -> dict:
  """``{split: random-access source}`` of a prepared data set (no TensorFlow).

  ``path`` is the version folder TFDS wrote, e.g.
  ``<data_dir>/crema_d/standard/1.1.0`` (``builder.data_dir``). Frames come
  back JPEG-encoded (``bytes``, a :class:`PreparedSource`) unless
  ``decode_frames`` (TFDS's own decoding: uint8 arrays, all frames): the
  pipeline decodes only the frames it samples.

  Every file is checked to open and hold its records (cheap: the files'
  indices are read); a damaged record raises :class:`DataError` naming the
  file when it is read. Either error says to delete ``path`` and prepare the
  data set again.
  """
  if tfds is None:
    raise ImportError("reading prepared data needs tensorflow-datasets.")
  path = pathlib.Path(path)
  if not (path / "dataset_info.json").is_file():
    raise DataError(f"{path} is not a prepared data set (no "
                    "dataset_info.json); run arl_jax.data.prepare first.")
  builder = tfds.builder_from_directory(os.fspath(path))
  _check_shards(builder.info, path)
  if decode_frames:
    return {split: _NamedReads(source, builder.info, split)
            for split, source in builder.as_data_source().items()}
  features = sorted(builder.info.features.keys())
  if features != sorted(_FEATURES):
    raise DataError(f"{path} holds features {features}, not those of an "
                    f"arl_jax audio-visual data set {sorted(_FEATURES)}.")
  raw = builder.as_data_source(
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return {split: PreparedSource(source, builder.info, split)
          for split, source in raw.items()}
