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
it is read (:func:`arl_jax.data.prepared.load_prepared`).

The clip lists and folder layouts are in :mod:`arl_jax.data.layouts`, the
storage format and its reader in :mod:`arl_jax.data.prepared`.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from arl_jax.data import audio as audio_lib
from arl_jax.data import prepared
from arl_jax.data.layouts import AV_DATA_SETS
from arl_jax.data.layouts import AVE_CLASSES
from arl_jax.data.layouts import CREMA_D_CLASSES
from arl_jax.data.layouts import Clip
from arl_jax.data.layouts import DataError
from arl_jax.data.layouts import check_clip_lists
from arl_jax.data.layouts import layout_error
from arl_jax.data.layouts import missing_entries
from arl_jax.data.layouts import read_list
from arl_jax.data.layouts import read_utf8
from arl_jax.data.layouts import stratified_holdout

try:  # TFDS is an optional dependency (the `data` extra).
  import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover
  tfds = None


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
      missing = missing_entries(pathlib.Path(root), cls.LAYOUT)
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
      check_clip_lists(splits)
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
      train = clips(read_list(root / "train.csv"))
      test = clips(read_list(root / "test.csv"))
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
      return tuple(l.strip() for l in read_utf8(path).splitlines() if l.strip())

    def list_splits(self, root):
      out = {}
      for split in ("train", "validation", "test"):
        path = root / f"{split}.csv"
        if split == "validation" and not path.is_file():
          continue
        out[split] = [Clip(c, label, root / "audio" / f"{c}.wav",
                           root / "frames" / c, listed=where)
                      for c, label, where in read_list(path)]
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
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
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
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  # One preparation at a time per data_dir (two runs starting together).
  with _PreparationLock(data_dir / f".prepare_{name}.lock"):
    return _prepare_locked(name, manual_dir, data_dir, skip_invalid,
                           builder_kwargs)


FINGERPRINT = "source_fingerprint.json"


def source_fingerprint(name: str, manual_dir: pathlib.Path,
                       builder_kwargs: dict) -> dict:
  """What a prepared copy was prepared from: the builder's arguments, the
  SHA-256 of every list file at the top of ``manual_dir`` and, for each
  folder of the layout, the number and total size of its files."""
  import hashlib
  cls = BUILDERS[name]
  lists = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(manual_dir.iterdir())
           if p.is_file() and p.suffix in (".csv", ".txt")}
  folders = {}
  for entry, _ in cls.LAYOUT:
    if entry.endswith("/"):
      count = size = 0
      for dirpath, _, files in os.walk(manual_dir / entry.rstrip("/")):
        for f in files:
          count += 1
          size += os.stat(os.path.join(dirpath, f)).st_size
      folders[entry] = {"files": count, "bytes": size}
  return {"data_set": name, "arguments": {k: repr(v) for k, v in
                                           sorted(builder_kwargs.items())},
          "lists": lists, "folders": folders}


class _PreparationLock:
  """``flock`` on a file next to the prepared data (released on exit)."""

  def __init__(self, path: pathlib.Path):
    self.path, self.fd = path, None

  def __enter__(self):
    import fcntl
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process preparing into {self.path.parent}",
            flush=True)
      fcntl.flock(self.fd, fcntl.LOCK_EX)
    except OSError:     # no flock on this filesystem: prepare unlocked
      pass
    return self

  def __exit__(self, *exc):
    os.close(self.fd)


def _prepare_locked(name, manual_dir, data_dir, skip_invalid, builder_kwargs):
  cls = BUILDERS[name]
  missing = missing_entries(manual_dir, cls.LAYOUT)
  try:
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record",
                  manual_dir=manual_dir, skip_invalid=skip_invalid,
                  **builder_kwargs)
  except DataError:   # Kinetics-Sounds reads classes.txt here
    if missing:
      raise layout_error(cls.TITLE, manual_dir, cls.LAYOUT, missing) from None
    raise
  prepared_dir = pathlib.Path(builder.data_dir)
  if missing and not prepared_dir.exists():  # else reused
    raise layout_error(cls.TITLE, manual_dir, cls.LAYOUT, missing)
  fingerprint = (None if missing else
                 source_fingerprint(name, manual_dir, builder_kwargs))
  record = prepared_dir / FINGERPRINT
  if prepared_dir.exists() and record.is_file() and fingerprint is not None:
    try:
      saved = json.loads(record.read_text())
    except ValueError:
      saved = None
    if saved != fingerprint:
      changed = sorted(k for k in fingerprint
                       if (saved or {}).get(k) != fingerprint[k])
      raise DataError(
          f"{prepared_dir} was prepared from another copy of {cls.TITLE} than "
          f"{manual_dir} (different {', '.join(changed) or 'record'}); delete "
          f"{prepared_dir} to prepare it again from {manual_dir}, or use "
          "another prepared_dir.")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir)))
  prepared.store_uncompressed(builder.data_dir)
  if fingerprint is not None and not record.is_file():
    record.write_text(json.dumps(fingerprint, indent=1))
  if builder.skipped:
    report = prepared_dir / "prepare_report.json"
    report.write_text(json.dumps({"skipped": builder.skipped}, indent=1))
  return builder
