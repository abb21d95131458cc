"""TFDS builders for CREMA-D, Kinetics-Sounds and AVE, from a user's local copy.

Nothing is downloaded: each builder reads a folder the user already has (the
layouts are in the README and in each class's docstring), computes the
log-magnitude spectrogram once (:mod:`arl_jax.data.audio`), stores the frames
as JPEG images (shorter side resized to ``frame_size``) and writes array_record
files that :func:`tfds.data_source` / ``builder.as_data_source()`` read without
TensorFlow. Splits: ``train``, ``validation`` (official where the data set has
one, otherwise carved from train, stratified by class, fixed seed) and
``test``.

Bad input: a missing root or a folder without the data set's layout raises
:class:`DataError` saying what the layout needs. A listed clip without audio
or frames, an unreadable WAV or JPEG, a WAV file cut short (fewer samples than
its header declares) or an unknown label raises :class:`DataError` naming the
file; with ``skip_invalid=True`` such clips are skipped instead and listed in
``prepare_report.json`` next to the prepared data (:func:`prepare`). A
damaged prepared file (array_record) raises :class:`DataError` naming it when
it is read (:func:`load_prepared`).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import itertools
import json
import os
import pathlib
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from arl_jax.data import audio as audio_lib

try:  # TFDS is an optional dependency (the `data` extra).
  import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover
  tfds = None


class DataError(ValueError):
  """Bad input data; the message names the file and the problem."""


# The data sets :func:`prepare` builds (its ``name``; ``BUILDERS``' keys).
AV_DATA_SETS = ("crema_d", "kinetics_sounds", "ave")

CREMA_D_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
AVE_CLASSES = (
    "Church bell", "Male speech, man speaking", "Bark",
    "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute",
    "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle",
    "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat",
    "Baby cry, infant cry", "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush",
    "Rodents, rats", "Accordion", "Mandolin")


@dataclasses.dataclass(frozen=True)
class Clip:
  clip_id: str
  label: str
  audio: pathlib.Path
  frames: pathlib.Path
  group: str = ""          # e.g. CREMA-D actor, for group-disjoint splits
  listed: str = ""         # where the clip is listed: "<file>, line <n>"


def _read_list(path: pathlib.Path) -> list[tuple[str, str, str]]:
  """``(clip, label, "<path>, line <n>")`` of each "clip,label" line."""
  if not path.is_file():
    raise DataError(f"split list {path} does not exist.")
  rows = []
  with open(path, newline="") as f:
    for n, row in enumerate(csv.reader(f), 1):
      if not row or not row[0].strip():
        continue
      if len(row) < 2:
        raise DataError(f"{path}, line {n}: expected 'clip,label'; got {row}.")
      rows.append((row[0].strip(), row[1].strip(), f"{path}, line {n}"))
  return rows


def _missing(root: pathlib.Path, layout) -> list[str]:
  """The entries of ``layout`` (``name/`` a folder, else a file) not in root."""
  missing = []
  for name, _ in layout:
    path = root / name.rstrip("/")
    if not (path.is_dir() if name.endswith("/") else path.is_file()):
      missing.append(name)
  return missing


def layout_error(title: str, root: pathlib.Path, layout, missing) -> DataError:
  """The error for a folder without a data set's layout: what it needs."""
  need = "\n".join(f"  {name:<14} {what}" for name, what in layout)
  return DataError(
      f"data root {root} does not have the {title} layout: missing "
      f"{', '.join(missing)}. It must hold:\n{need}\n(the arl_jax README's "
      "layout table; arl_jax.data.fixtures writes tiny examples).")


def stratified_holdout(clips: Sequence[Clip], fraction: float, seed: int
                       ) -> tuple[list[Clip], list[Clip]]:
  """Splits ``clips`` into (rest, held out), ``fraction`` of each class held out."""
  rng = np.random.default_rng(seed)
  rest, held = [], []
  labels = sorted({c.label for c in clips})
  for label in labels:
    group = sorted((c for c in clips if c.label == label),
                   key=lambda c: c.clip_id)
    order = rng.permutation(len(group))
    k = int(round(fraction * len(group)))
    if len(group) >= 2:
      k = max(k, 1)           # every class represented in both parts
    held += [group[i] for i in order[:k]]
    rest += [group[i] for i in order[k:]]
  return (sorted(rest, key=lambda c: c.clip_id),
          sorted(held, key=lambda c: c.clip_id))


def _encode_frame(path: pathlib.Path, frame_size: int | None
                  ) -> tuple[bytes, tuple[int, int]]:
  """JPEG bytes of a frame (shorter side at most ``frame_size``), its (h, w)."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if frame_size and min(img.size) > frame_size:   # only ever shrink
        w, h = img.size
        scale = frame_size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.BILINEAR)
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=90)
      return buf.getvalue(), (img.size[1], img.size[0])
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read image {path}: {e}") from e


if tfds is not None:

  class AudioVisualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the three builders; subclasses say where the clips are."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Spectrogram (float32 bytes), JPEG frames, label, clip id.",
        "1.1.0": "Records stored uncompressed (4x faster random reads); "
                 "frames re-encoded at JPEG quality 90 instead of 95 (25% "
                 "faster decoding, ~30% smaller); metadata frame_hw_max (the "
                 "largest stored frame).",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Nothing is downloaded. Pass the folder of your local copy as "
        "download_config=tfds.download.DownloadConfig(manual_dir=...) (see "
        "the arl_jax README for the expected layout).")
    CLASSES: tuple[str, ...] = ()
    TITLE = ""
    # What the local copy must hold: (name, what), "name/" a folder.
    LAYOUT: tuple[tuple[str, str], ...] = ()
    SAMPLE_RATE = 22050
    SECONDS = 3.0
    HOP = 353
    TIME_FRAMES: int | None = None
    MAX_FRAMES = 10
    VALIDATION_FRACTION = 0.1

    def __init__(self, *, manual_dir: str | os.PathLike | None = None,
                 skip_invalid: bool = False, frame_size: int | None = 256,
                 seed: int = 0, **kwargs):
      self._manual_root = None if manual_dir is None else pathlib.Path(manual_dir)
      self.skip_invalid = skip_invalid
      self.frame_size = frame_size
      self.seed = seed
      self.skipped: list[dict] = []
      super().__init__(**kwargs)

    @classmethod
    def check_layout(cls, root: pathlib.Path) -> None:
      """Raises :class:`DataError` (what is needed) if ``root`` lacks LAYOUT."""
      missing = _missing(pathlib.Path(root), cls.LAYOUT)
      if missing:
        raise layout_error(cls.TITLE, pathlib.Path(root), cls.LAYOUT, missing)

    # -- what subclasses provide ------------------------------------------
    def list_splits(self, root: pathlib.Path) -> dict[str, list[Clip]]:
      raise NotImplementedError

    def classes(self, root: pathlib.Path | None = None) -> tuple[str, ...]:
      return self.CLASSES

    # -- TFDS -------------------------------------------------------------
    def _spectrogram_shape(self):
      frames = self.TIME_FRAMES or 1 + int(self.SAMPLE_RATE * self.SECONDS) // self.HOP
      return (257, frames)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=self.__doc__,
          features=tfds.features.FeaturesDict({
              # One bytes blob rather than a protobuf float list: reading
              # it back is a memory copy, not a parse of 48k floats.
              "audio": tfds.features.Tensor(
                  shape=self._spectrogram_shape(), dtype=np.float32,
                  encoding=tfds.features.Encoding.BYTES),
              "frames": tfds.features.Sequence(tfds.features.Image(
                  shape=(None, None, 3), encoding_format="jpeg")),
              "label": tfds.features.ClassLabel(names=list(self.classes())),
              "clip_id": tfds.features.Text(),
          }),
          supervised_keys=None,
          # frame_hw_max: the largest stored frame (height, width), the
          # canvas of the device-augmentation pipeline; filled while preparing.
          metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
      # The root as given (TFDS's dl_manager.manual_dir asserts that the
      # folder is not empty, with advice meant for TFDS's own data sets).
      root = self._manual_root or pathlib.Path(dl_manager.manual_dir)
      if not root.is_dir():
        raise DataError(f"data root {root} does not exist.")
      self.check_layout(root)
      splits = self.list_splits(root)
      known = set(self.classes(root))
      for name, clips in splits.items():
        keep = []
        for c in clips:
          if c.label in known:
            keep.append(c)
            continue
          reason = (f"clip {c.clip_id!r} ({c.listed or name}) has unknown "
                    f"label {c.label!r}; known labels: {sorted(known)}.")
          if not self.skip_invalid:
            raise DataError(reason)
          self.skipped.append({"clip_id": c.clip_id, "reason": reason})
        if clips and not keep:   # a wrong label list, not a few bad clips
          raise DataError(f"no clip of split {name!r} has a known label (e.g. "
                          f"{clips[0].label!r}, {clips[0].listed}); known "
                          f"labels: {sorted(known)}.")
        splits[name] = keep
      if "validation" not in splits:
        splits["train"], splits["validation"] = stratified_holdout(
            splits["train"], self.VALIDATION_FRACTION, self.seed)
      return {name: self._generate_examples(clips)
              for name, clips in splits.items()}

    def _example(self, clip: Clip) -> dict:
      if not clip.audio.is_file():
        raise DataError(f"clip {clip.clip_id!r}: audio file {clip.audio} is "
                        "missing.")
      frames = sorted(p for p in clip.frames.glob("*")
                      if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if (
                          clip.frames.is_dir()) else []
      if not frames:
        raise DataError(f"clip {clip.clip_id!r}: no frames (*.jpg) in "
                        f"{clip.frames}.")
      if len(frames) > self.MAX_FRAMES:   # evenly spaced subset
        idx = np.linspace(0, len(frames) - 1, self.MAX_FRAMES).round()
        frames = [frames[int(i)] for i in idx]
      try:
        spec = audio_lib.wav_to_spectrogram(
            clip.audio, sample_rate=self.SAMPLE_RATE, seconds=self.SECONDS,
            hop=self.HOP, frames=self.TIME_FRAMES)
      except (audio_lib.AudioError, FileNotFoundError) as e:
        raise DataError(f"clip {clip.clip_id!r}: {e}") from e
      encoded = [_encode_frame(p, self.frame_size) for p in frames]
      for _, (h, w) in encoded:
        hw = self.info.metadata.get("frame_hw_max", [0, 0])
        self.info.metadata["frame_hw_max"] = [max(hw[0], h), max(hw[1], w)]
      return {"audio": spec, "frames": [jpeg for jpeg, _ in encoded],
              "label": clip.label, "clip_id": clip.clip_id}

    def _generate_examples(self, clips: Sequence[Clip]) -> Iterator:
      for clip in clips:
        try:
          example = self._example(clip)
        except DataError as e:
          if not self.skip_invalid:
            raise
          self.skipped.append({"clip_id": clip.clip_id, "reason": str(e)})
          continue
        yield clip.clip_id, example

  class CremaD(AudioVisualBuilder, skip_registration=True):
    """CREMA-D (Cao et al., 2014): 6 emotions, 7,442 clips of 91 actors.

    Layout of the local copy (as the OGM-GE/ARL code bases use it)::

      ROOT/AudioWAV/1001_DFA_ANG_XX.wav
      ROOT/Image-01-FPS/1001_DFA_ANG_XX/*.jpg      (frames at 1 fps)
      ROOT/train.csv, ROOT/test.csv                 ("clip,label" lines)

    Spectrogram: 3 s at 22.05 kHz, n_fft 512, hop 353: 257 x 188.
    ``actor_disjoint=True`` ignores the lists' train/test assignment and splits
    the actors instead (70% / 10% / 20%, by ``seed``), so no actor appears in
    two splits (the common split shares actors between train and test).
    """

    CLASSES = CREMA_D_CLASSES
    TITLE = "CREMA-D"
    LAYOUT = (
        ("AudioWAV/", "<clip>.wav, e.g. AudioWAV/1001_DFA_ANG_XX.wav"),
        ("Image-01-FPS/", "<clip>/*.jpg, the frames at 1 fps"),
        ("train.csv", "'clip,label' lines (labels NEU HAP SAD FEA DIS ANG)"),
        ("test.csv", "'clip,label' lines"))
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="standard",
                                description="the lists' train/test split"),
        tfds.core.BuilderConfig(name="actor_disjoint",
                                description="actors split 70/10/20"),
    ]

    @property
    def actor_disjoint(self) -> bool:
      return self.builder_config.name == "actor_disjoint"

    def list_splits(self, root):
      def clips(rows):
        return [Clip(c, label, root / "AudioWAV" / f"{c}.wav",
                     root / "Image-01-FPS" / c, group=c.split("_")[0],
                     listed=where)
                for c, label, where in rows]
      train = clips(_read_list(root / "train.csv"))
      test = clips(_read_list(root / "test.csv"))
      if not self.actor_disjoint:
        return {"train": train, "test": test}
      everyone = sorted(train + test, key=lambda c: c.clip_id)
      actors = sorted({c.group for c in everyone})
      order = np.random.default_rng(self.seed).permutation(len(actors))
      n_test, n_val = round(0.2 * len(actors)), round(0.1 * len(actors))
      test_a = {actors[i] for i in order[:n_test]}
      val_a = {actors[i] for i in order[n_test:n_test + n_val]}
      pick = lambda s: [c for c in everyone if c.group in s]
      rest = set(actors) - test_a - val_a
      return {"train": pick(rest), "validation": pick(val_a),
              "test": pick(test_a)}

  class KineticsSounds(AudioVisualBuilder, skip_registration=True):
    """Kinetics-Sounds (Arandjelovic & Zisserman, 2017), from local files.

    Layout::

      ROOT/audio/<clip>.wav
      ROOT/frames/<clip>/*.jpg
      ROOT/classes.txt                              (one class name a line)
      ROOT/train.csv, ROOT/test.csv [, ROOT/validation.csv]   ("clip,label")

    Spectrogram: 10 s at 16 kHz, n_fft 512, hop 159, cropped to 257 x 1004
    (the paper's shape); three frames are sampled per clip by the pipeline.
    """

    SAMPLE_RATE, SECONDS, HOP, TIME_FRAMES = 16000, 10.0, 159, 1004
    TITLE = "Kinetics-Sounds"
    LAYOUT = (
        ("audio/", "<clip>.wav"),
        ("frames/", "<clip>/*.jpg"),
        ("classes.txt", "one class name a line"),
        ("train.csv", "'clip,label' lines"),
        ("test.csv", "'clip,label' lines (validation.csv optional)"))

    def classes(self, root=None):
      root = root or self._manual_root
      if root is None:
        raise DataError("Kinetics-Sounds needs manual_dir (for classes.txt) "
                        "to be prepared; read a prepared copy with "
                        "arl_jax.data.load_prepared(...).")
      path = pathlib.Path(root) / "classes.txt"
      if not path.is_file():
        raise DataError(f"Kinetics-Sounds class list {path} does not exist.")
      return tuple(l.strip() for l in path.read_text().splitlines() if l.strip())

    def list_splits(self, root):
      out = {}
      for split in ("train", "validation", "test"):
        path = root / f"{split}.csv"
        if split == "validation" and not path.is_file():
          continue
        out[split] = [Clip(c, label, root / "audio" / f"{c}.wav",
                           root / "frames" / c, listed=where)
                      for c, label, where in _read_list(path)]
      return out

  class AVE(AudioVisualBuilder, skip_registration=True):
    """AVE, Audio-Visual Event localisation (Tian et al., 2018): 28 events.

    Layout (the official annotation files, plus extracted audio and frames)::

      ROOT/audio/<VideoID>.wav
      ROOT/frames/<VideoID>/*.jpg
      ROOT/trainSet.txt, ROOT/valSet.txt, ROOT/testSet.txt
          (lines "Category&VideoID&Quality&StartTime&EndTime")

    Spectrogram as Kinetics-Sounds (257 x 1004).
    """

    CLASSES = AVE_CLASSES
    SAMPLE_RATE, SECONDS, HOP, TIME_FRAMES = 16000, 10.0, 159, 1004
    TITLE = "AVE"
    LAYOUT = (
        ("audio/", "<VideoID>.wav"),
        ("frames/", "<VideoID>/*.jpg"),
        ("trainSet.txt", "'Category&VideoID&Quality&StartTime&EndTime' lines"),
        ("testSet.txt", "the same (valSet.txt optional)"))

    def list_splits(self, root):
      out = {}
      for split, name in (("train", "trainSet.txt"), ("validation", "valSet.txt"),
                          ("test", "testSet.txt")):
        path = root / name
        if split == "validation" and not path.is_file():
          continue
        if not path.is_file():
          raise DataError(f"AVE split list {path} does not exist.")
        clips = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
          if not line.strip() or line.startswith("Category&"):
            continue
          parts = line.split("&")
          if len(parts) < 2:
            raise DataError(f"{path}, line {n}: expected "
                            f"'Category&VideoID&...'; got {line!r}.")
          category, vid = parts[0].strip(), parts[1].strip()
          clips.append(Clip(vid, category, root / "audio" / f"{vid}.wav",
                            root / "frames" / vid, listed=f"{path}, line {n}"))
        out[split] = clips
      return out

  BUILDERS = dict(zip(AV_DATA_SETS, (CremaD, KineticsSounds, AVE)))
else:  # pragma: no cover
  BUILDERS = {}


def prepare(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            *, skip_invalid: bool = False, **builder_kwargs):
  """Prepares a data set once from a local copy; returns the TFDS builder.

  Args:
    name: ``crema_d``, ``kinetics_sounds`` or ``ave``.
    manual_dir: the local copy (layout: the builder's docstring, README).
    data_dir: where the prepared array_record files go.
    skip_invalid: skip bad clips (missing or unreadable audio or frames, a
      WAV file cut short, an unknown label) instead of raising
      :class:`DataError`; they are listed in ``prepare_report.json``.
    **builder_kwargs: ``frame_size``, ``seed``, ``config="actor_disjoint"``
      (CREMA-D).

  The skipped clips (with ``skip_invalid=True``) are written to
  ``prepare_report.json`` in ``builder.data_dir``; an already prepared data
  set is reused as is (TFDS never overwrites it). A ``manual_dir`` without
  the data set's layout raises :class:`DataError` listing what it needs
  (before TFDS starts preparing).
  """
  if tfds is None:
    raise ImportError("preparing audio-visual data needs tensorflow-datasets: "
                      "pip install 'arl_jax[data]'.")
  if name not in BUILDERS:
    raise ValueError(f"unknown data set {name!r}; known: {sorted(BUILDERS)}.")
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    raise DataError(f"data root {manual_dir} does not exist.")
  cls = BUILDERS[name]
  missing = _missing(manual_dir, cls.LAYOUT)
  try:
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record",
                  manual_dir=manual_dir, skip_invalid=skip_invalid,
                  **builder_kwargs)
  except DataError:   # Kinetics-Sounds reads classes.txt here
    if missing:
      raise layout_error(cls.TITLE, manual_dir, cls.LAYOUT, missing) from None
    raise
  if missing and not pathlib.Path(builder.data_dir).exists():  # else reused
    raise layout_error(cls.TITLE, manual_dir, cls.LAYOUT, missing)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir)))
  store_uncompressed(builder.data_dir)
  if builder.skipped:
    report = pathlib.Path(builder.data_dir) / "prepare_report.json"
    report.write_text(json.dumps({"skipped": builder.skipped}, indent=1))
  return builder


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

