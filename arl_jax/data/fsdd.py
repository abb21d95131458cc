"""The Free Spoken Digit Dataset (FSDD) as a TFDS builder, without TensorFlow.

FSDD (Jackson et al.) is real speech: 3,000 mono 8 kHz 16-bit WAV
recordings of the digits 0-9, six speakers (:data:`SPEAKERS`) x 50
recordings per digit, named ``recordings/{digit}_{speaker}_{index}.wav``
(index 0-49); licence CC BY-SA 4.0. The copy read here is the data set's
repository at commit 26eb9aaf (2024-05-02), whose SHA-256 per file ships with
this package (``fsdd_sha256.txt``): :func:`verify` checks a local copy
against it (unknown, missing, empty, cut-short or modified files raise
:class:`DataError` naming the file) before anything is computed from it.

Each recording becomes a log-magnitude spectrogram of its first second
(:func:`spectrogram`: float32 ``[129, 63]``). :class:`SpokenDigits` writes
them, with the digit, the speaker, the index and the file name, to
array_record files in one split ``train`` (all 3,000 recordings; the
speaker-disjoint or official splits are the caller's), which
:func:`load` reads back into arrays without TensorFlow.

Where the local copy is: ``prepare(data_dir, root)``, else the environment
variable ``ARL_JAX_FSDD``, else ``../shared/data/fsdd`` next to the working
directory or the repository (:func:`default_root`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
import pathlib

import numpy as np

from arl_jax.data import audio as audio_lib
from arl_jax.data import prepared
from arl_jax.data.layouts import DataError

try:  # TFDS is an optional dependency (the `data` extra).
  import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover
  tfds = None


# The speakers, sorted; each recorded every digit 50 times.
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
DIGITS = 10                  # the classes: digits 0-9
RECORDINGS_PER = 50          # recordings per (digit, speaker): index 0-49
NUM_RECORDINGS = DIGITS * len(SPEAKERS) * RECORDINGS_PER   # 3,000
SAMPLE_RATE = 8000           # Hz, of every recording and of the front end
SECONDS = 1.0                # the window: recordings padded or cropped to it
NUM_SAMPLES = int(SAMPLE_RATE * SECONDS)   # 8,000
N_FFT = 256                  # STFT size: 32 ms, 129 frequency bins
HOP = 128                    # STFT hop: 16 ms
SPECTROGRAM_SHAPE = (N_FFT // 2 + 1, 1 + NUM_SAMPLES // HOP)   # (129, 63)

# The network path (SpokenDigits without a local copy): the repository's
# archive at the commit the checksum list was made from, which holds
# free-spoken-digit-dataset-<commit>/recordings/. TFDS's own `spoken_digit`
# downloads the release archive .../archive/v1.0.9.tar.gz instead, which by
# TFDS's catalogue holds 2,500 recordings of 5 speakers (no "lucas"), so it
# would not pass `verify`.
SOURCE_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
URL = ("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/"
       f"{SOURCE_COMMIT}.tar.gz")
# SHA-256 over the sorted (file name, file bytes) of recordings/ (SOURCE.md).
AGGREGATE_SHA256 = (
    "45a9b976ba3397a2fd5c70a9f2e43c34f442a3a6be47392ecfc41174b678f37e")
ENV_VAR = "ARL_JAX_FSDD"
_CHECKSUMS = "fsdd_sha256.txt"
_SHOWN = 5                   # file names listed in an error message


def file_name(digit: int, speaker: str, index: int) -> str:
  """The file name of a recording: ``{digit}_{speaker}_{index}.wav``."""
  return f"{digit}_{speaker}_{index}.wav"


def parse_name(name: str) -> tuple[int, str, int]:
  """``(digit, speaker, index)`` of a recording's file name (no check)."""
  digit, speaker, index = name[:-len(".wav")].split("_")
  return int(digit), speaker, int(index)


@functools.cache
def checksums() -> dict[str, str]:
  """``{file name: SHA-256 hex}`` of the 3,000 recordings (package data)."""
  text = importlib.resources.files("arl_jax.data").joinpath(
      _CHECKSUMS).read_text()
  out = {}
  for line in text.splitlines():
    digest, name = line.split()
    out[name] = digest
  return out


def default_root() -> pathlib.Path | None:
  """Where the local copy of FSDD is, or None.

  The environment variable ``ARL_JAX_FSDD`` if set (as given, checked later
  by :func:`verify`); else the first existing of ``../shared/data/fsdd``
  relative to the working directory and to the repository root holding this
  file; else None.
  """
  if os.environ.get(ENV_VAR):
    return pathlib.Path(os.environ[ENV_VAR])
  repo = pathlib.Path(__file__).resolve().parents[2]
  for candidate in (pathlib.Path.cwd() / "../shared/data/fsdd",
                    repo / "../shared/data/fsdd"):
    if candidate.is_dir():
      return candidate.resolve()
  return None


def _recordings_dir(root: str | os.PathLike) -> pathlib.Path:
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f"FSDD root {root} does not exist. Pass the folder holding "
                    f"recordings/, or set {ENV_VAR} to it.")
  folder = root / "recordings"
  if not folder.is_dir():
    raise DataError(f"FSDD root {root} has no recordings/ folder (it must hold "
                    "recordings/{digit}_{speaker}_{index}.wav, e.g. "
                    "recordings/0_george_0.wav).")
  return folder


def _listed(names) -> str:
  names = sorted(names)
  more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def _damage(path: pathlib.Path, data: bytes, expected: str) -> str:
  """Why a recording's bytes are not FSDD's: empty, cut short or modified."""
  if not data:
    return f"{path} is empty (0 bytes)"
  try:
    audio_lib.read_wav(path)
  except audio_lib.AudioError as e:   # names the file: cut short, no samples
    return str(e).rstrip(".")
  return (f"{path} is modified or damaged: its SHA-256 is "
          f"{hashlib.sha256(data).hexdigest()}, FSDD's is {expected}")


def verify(root: str | os.PathLike) -> list[pathlib.Path]:
  """The 3,000 recordings of a local FSDD copy, sorted by file name.

  ``root`` holds ``recordings/``. Raises :class:`DataError` naming the
  problem and the files: ``root`` or ``recordings/`` missing; entries of
  ``recordings/`` that are not FSDD recordings (any other name, e.g. a
  sixth index 50, an unknown speaker or a stray file); recordings missing
  (how many, and the first few); a recording that is empty (0 bytes), cut
  short (fewer samples than its header declares) or holds no samples; one
  whose bytes differ from FSDD's (SHA-256 against the list shipped with the
  package: "modified or damaged"). Reads every file once (27 MB, ~0.1 s).
  """
  folder = _recordings_dir(root)
  expected = checksums()
  present = {p.name: p for p in folder.iterdir()}
  unknown = set(present) - set(expected)
  if unknown:
    raise DataError(
        f"{folder} holds {len(unknown)} file(s) that are not FSDD recordings: "
        f"{_listed(unknown)}. Recordings are named "
        "{digit}_{speaker}_{index}.wav with digit 0-9, speaker one of "
        f"{', '.join(SPEAKERS)} and index 0-{RECORDINGS_PER - 1}; remove the "
        "others.")
  missing = set(expected) - set(present)
  if missing:
    raise DataError(
        f"{len(missing)} of the {NUM_RECORDINGS} FSDD recordings are missing "
        f"from {folder}: {_listed(missing)}. Copy them again from the data "
        "set's repository.")
  problems = []
  for name in sorted(expected):
    path = present[name]
    if not path.is_file():
      problems.append(f"{path} is not a file")
      continue
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected[name]:
      problems.append(_damage(path, data, expected[name]))
  if problems:
    more = (f"\n  ... ({len(problems) - _SHOWN} more)"
            if len(problems) > _SHOWN else "")
    raise DataError(
        f"{len(problems)} FSDD recording(s) in {folder} are not the data "
        "set's files:\n  " + "\n  ".join(problems[:_SHOWN]) + more
        + "\nReplace them with complete copies from the data set's repository.")
  return [present[name] for name in sorted(expected)]


def aggregate_sha256(root: str | os.PathLike) -> str:
  """SHA-256 over the sorted (file name, file bytes) of ``root/recordings``.

  The definition that reproduces SOURCE.md's value (``AGGREGATE_SHA256``):
  one SHA-256 fed, for each regular file sorted by name (Python string
  order), its name's UTF-8 bytes and then its bytes, nothing between.
  """
  folder = _recordings_dir(root)
  digest = hashlib.sha256()
  for path in sorted((p for p in folder.iterdir() if p.is_file()),
                     key=lambda p: p.name):
    digest.update(path.name.encode("utf-8"))
    digest.update(path.read_bytes())
  return digest.hexdigest()


def spectrogram(samples: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
  """The front end: float32 ``[129, 63]`` log-magnitude spectrogram of 1 s.

  ``samples`` (mono, in [-1, 1]) are resampled to 8 kHz if ``rate`` is not
  (:func:`audio.resample`), then brought to exactly 1 s (8,000 samples):
  a shorter recording is zero-padded at its end (silence after the digit;
  most of FSDD, median 0.42 s), a longer one (about 1% of FSDD, up to
  2.3 s) is cropped to its first second. Then
  ``log(|STFT| + 1e-7)`` with ``n_fft=256``, ``hop=128``, a periodic Hann
  window and centred frames (:func:`audio.log_spectrogram`): 129 bins x
  ``1 + 8000 // 128 = 63`` frames. No normalisation and no clipping.
  """
  x = np.asarray(samples, np.float32)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"expected mono samples (a non-empty 1-D array); got "
                     f"shape {x.shape}.")
  x = audio_lib.resample(x, int(rate), SAMPLE_RATE)[:NUM_SAMPLES]
  x = np.pad(x, (0, NUM_SAMPLES - len(x)))
  return audio_lib.log_spectrogram(x, n_fft=N_FFT, hop=HOP)


def wav_spectrogram(path: str | os.PathLike) -> np.ndarray:
  """:func:`spectrogram` of a WAV file (an unreadable one raises AudioError)."""
  samples, rate = audio_lib.read_wav(path)
  return spectrogram(samples, rate)


@dataclasses.dataclass(frozen=True)
class SpokenDigitArrays:
  """All of FSDD in memory, one row per recording, sorted by file name.

  ``spectrograms`` float32 ``[3000, 129, 63]`` (:func:`spectrogram`),
  ``labels`` int32 ``[3000]`` (the digit), ``speakers`` str ``[3000]``,
  ``indices`` int32 ``[3000]`` (the recording's index 0-49; 0-4 are the data
  set's official test set), ``file_names`` e.g. ``"0_george_0.wav"``.
  """

  spectrograms: np.ndarray
  labels: np.ndarray
  speakers: np.ndarray
  indices: np.ndarray
  file_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.file_names)


if tfds is not None:

  class SpokenDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Free Spoken Digit Dataset: 3,000 recordings of digits, 6 speakers.

    Features: ``spectrogram`` float32 [129, 63] (1 s at 8 kHz, n_fft 256,
    hop 128; stored as one bytes blob), ``label`` the digit (ClassLabel,
    10), ``speaker``, ``index`` (0-49, int32) and ``file_name``. One split,
    ``train``, holding every recording; records are in TFDS's (hashed key)
    order, :func:`load` sorts them by file name.

    ``manual_dir`` is a local copy (the folder holding ``recordings/``),
    checked with :func:`verify` before anything is generated. Without one
    (``manual_dir=None`` and no :func:`default_root`) the repository's
    archive (``URL``) is downloaded and extracted by TFDS and its
    ``recordings/`` verified the same way.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Log-magnitude spectrogram of the first second (float32 "
                 "bytes, 129 x 63), digit, speaker, index, file name.",
    }

    def __init__(self, *, manual_dir: str | os.PathLike | None = None,
                 **kwargs):
      self._manual_root = None if manual_dir is None else pathlib.Path(manual_dir)
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=self.__doc__,
          features=tfds.features.FeaturesDict({
              # One bytes blob rather than a protobuf float list (as the
              # audio-visual builders): reading it back is a memory copy.
              "spectrogram": tfds.features.Tensor(
                  shape=SPECTROGRAM_SHAPE, dtype=np.float32,
                  encoding=tfds.features.Encoding.BYTES),
              "label": tfds.features.ClassLabel(num_classes=DIGITS),
              "speaker": tfds.features.Text(),
              "index": tfds.features.Tensor(shape=(), dtype=np.int32),
              "file_name": tfds.features.Text(),
          }),
          supervised_keys=("spectrogram", "label"),
          homepage="https://github.com/Jakobovski/free-spoken-digit-dataset",
          license="CC BY-SA 4.0")

    def _download(self, dl_manager) -> pathlib.Path:
      """The network path: download and extract ``URL``, find its root.

      Cannot be exercised without a network (the tests never do): TFDS
      downloads the archive into its download folder and extracts it; the
      archive holds one folder (``free-spoken-digit-dataset-<commit>/``)
      with ``recordings/``, which :func:`verify` then checks as a local copy.
      """
      extracted = pathlib.Path(os.fspath(dl_manager.download_and_extract(URL)))
      found = sorted(p.parent for p in extracted.glob("*/recordings"))
      if not found:
        raise DataError(f"the downloaded FSDD archive ({URL}, extracted to "
                        f"{extracted}) has no <folder>/recordings/.")
      return found[0]

    def _split_generators(self, dl_manager):
      root = self._manual_root or default_root()
      if root is None:
        root = self._download(dl_manager)
      return {"train": self._generate_examples(verify(root))}

    def _generate_examples(self, paths):
      for path in paths:
        digit, speaker, index = parse_name(path.name)
        try:
          spec = wav_spectrogram(path)
        except audio_lib.AudioError as e:
          raise DataError(str(e)) from e
        yield path.stem, {"spectrogram": spec, "label": digit,
                          "speaker": speaker, "index": index,
                          "file_name": path.name}


def prepare(data_dir: str | os.PathLike,
            root: str | os.PathLike | None = None):
  """Prepares FSDD once under ``data_dir``; returns the TFDS builder.

  ``root`` is the local copy (the folder holding ``recordings/``; default
  :func:`default_root`), verified (:func:`verify`) before anything is
  written; nothing is downloaded. The array_record files go to
  ``builder.data_dir`` (``<data_dir>/spoken_digits/1.0.0``), stored
  uncompressed (:func:`prepared.store_uncompressed`). An already prepared
  copy is reused as is (TFDS never overwrites it), without reading
  ``root``.
  """
  # Measured on 2 CPU cores: preparing all 3,000 recordings (verify, the
  # spectrograms, TFDS's writing and shuffling, the uncompressed rewrite)
  # takes 2.1-2.4 s; reusing the prepared copy ~10 ms; load() 0.45 s.
  if tfds is None:
    raise ImportError("preparing FSDD needs tensorflow-datasets: "
                      "pip install 'arl_jax[data]'.")
  root = pathlib.Path(root) if root is not None else default_root()
  builder = SpokenDigits(data_dir=os.fspath(data_dir),
                         file_format="array_record", manual_dir=root)
  if not builder.is_prepared():
    if root is None:
      raise DataError(f"no local copy of FSDD found: pass root= (the folder "
                      f"holding recordings/) or set {ENV_VAR} to it.")
    verify(root)   # before TFDS creates anything
  builder.download_and_prepare()
  prepared.store_uncompressed(builder.data_dir)
  return builder


_FEATURES = ("file_name", "index", "label", "speaker", "spectrogram")


def load(data_dir: str | os.PathLike,
         root: str | os.PathLike | None = None) -> SpokenDigitArrays:
  """All 3,000 recordings as arrays, sorted by file name (no TensorFlow).

  Prepares FSDD under ``data_dir`` first if needed (:func:`prepare`, from
  ``root``), then reads every record back from the array_record files
  (TFDS's data source, records as raw bytes, the features taken from the
  ``tf.train.Example`` proto as :class:`prepared.PreparedSource` does). A
  damaged prepared file raises :class:`DataError` naming it.
  """
  builder = prepare(data_dir, root)
  info = builder.info
  version_dir = pathlib.Path(builder.data_dir)
  features = sorted(info.features.keys())
  if features != sorted(_FEATURES):
    raise DataError(f"{version_dir} holds features {features}, not FSDD's "
                    f"{sorted(_FEATURES)}.")
  prepared._check_shards(info, version_dir)
  raw = builder.as_data_source(
      split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  records = prepared._NamedReads(raw, info, "train")
  from tensorflow_datasets.proto import tf_example_pb2
  rows = []
  for record in records.__getitems__(list(range(len(records)))):
    f = tf_example_pb2.Example.FromString(record).features.feature
    rows.append((f["file_name"].bytes_list.value[0].decode(),
                 f["spectrogram"].bytes_list.value[0],
                 int(f["label"].int64_list.value[0]),
                 f["speaker"].bytes_list.value[0].decode(),
                 int(f["index"].int64_list.value[0])))
  rows.sort(key=lambda r: r[0])
  specs = np.stack([np.frombuffer(r[1], np.float32) for r in rows]).reshape(
      (len(rows), *SPECTROGRAM_SHAPE)) if rows else np.zeros(
          (0, *SPECTROGRAM_SHAPE), np.float32)
  return SpokenDigitArrays(
      spectrograms=specs,
      labels=np.array([r[2] for r in rows], np.int32),
      speakers=np.array([r[3] for r in rows], dtype=str),
      indices=np.array([r[4] for r in rows], np.int32),
      file_names=tuple(r[0] for r in rows))
