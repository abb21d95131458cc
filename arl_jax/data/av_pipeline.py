"""grain input pipeline for prepared audio-visual data (no TensorFlow).

Train: per-epoch shuffle, ``T`` frames sampled at random from the clip's
frames, each frame a random resized crop (scale 0.08-1, aspect 3/4-4/3) to
``image_size`` and a random horizontal flip. Frames leave the pipeline as
uint8 (4x less to copy to the accelerator); the ImageNet normalisation runs
on the device, in :class:`arl_jax.models.FrameEncoder`, unless
``normalize=True`` asks for float32 frames normalised here.
Evaluation: evenly spaced frames resized to ``image_size`` x ``image_size``,
the same every time, and a padded last batch with ``mask`` False on the
padding (every example evaluated once; the release drops the last batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _as_image(frame):
  """A PIL image from a PIL image, JPEG bytes or a uint8 array."""
  import io

  from PIL import Image
  if isinstance(frame, Image.Image):
    return frame
  if isinstance(frame, np.ndarray):
    return Image.fromarray(frame)
  img = Image.open(io.BytesIO(bytes(frame)))
  return img if img.mode == "RGB" else img.convert("RGB")


def _resize(frame, size: tuple[int, int], box=None) -> np.ndarray:
  """Resizes (the ``box`` region of) a frame to ``size`` = (height, width)."""
  from PIL import Image
  img = _as_image(frame)
  return np.asarray(img.resize(size[::-1], Image.BILINEAR, box=box))


def random_resized_crop(frame, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Crop of random area and aspect ratio, resized to ``size`` x ``size``.

  ``frame``: a uint8 ``[H, W, 3]`` array or JPEG bytes (cropped and resized
  in one PIL call, without a round trip through NumPy).
  """
  img = _as_image(frame)
  w, h = img.size
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return _resize(img, (size, size), (left, top, left + cw, top + ch))
  side = min(h, w)                           # fallback: central square
  top, left = (h - side) // 2, (w - side) // 2
  return _resize(img, (size, size), (left, top, left + side, top + side))


def _normalise(frames: np.ndarray) -> np.ndarray:
  return ((frames.astype(np.float32) / 255.0) - MEAN) / STD


def _frames_of(example) -> list:
  frames = example["frames"]
  if isinstance(frames, np.ndarray) and frames.ndim == 3:
    return [frames]
  return list(frames)


class TrainTransform:
  """Random frame choice, random resized crop, flip, normalisation."""

  def __init__(self, num_frames: int, image_size: int = 224,
               normalize: bool = False):
    self.num_frames, self.image_size = num_frames, image_size
    self.normalize = normalize

  def __call__(self, example, rng: np.random.Generator):
    frames = _frames_of(example)
    replace = len(frames) < self.num_frames
    idx = np.sort(rng.choice(len(frames), self.num_frames, replace=replace))
    out = []
    for i in idx:
      f = random_resized_crop(frames[i], self.image_size, rng)
      if rng.random() < 0.5:
        f = f[:, ::-1]
      out.append(f)
    frames = np.stack(out)
    return {"audio": np.asarray(example["audio"], np.float32),
            "visual": _normalise(frames) if self.normalize else frames,
            "label": np.int32(example["label"])}


class EvalTransform:
  """Evenly spaced frames, resized: deterministic."""

  def __init__(self, num_frames: int, image_size: int = 224,
               normalize: bool = False):
    self.num_frames, self.image_size = num_frames, image_size
    self.normalize = normalize

  def __call__(self, example):
    frames = _frames_of(example)
    idx = np.linspace(0, len(frames) - 1, self.num_frames).round().astype(int)
    out = np.stack([_resize(frames[i], (self.image_size, self.image_size))
                    for i in idx])
    return {"audio": np.asarray(example["audio"], np.float32),
            "visual": _normalise(out) if self.normalize else out,
            "label": np.int32(example["label"])}


def _collate(examples: Sequence[dict], batch_size: int) -> dict:
  n = len(examples)
  mask = np.zeros(batch_size, bool)
  mask[:n] = True
  pad = [examples[0]] * (batch_size - n)
  rows = list(examples) + pad
  return {"inputs": {"audio": np.stack([r["audio"] for r in rows]),
                     "visual": np.stack([r["visual"] for r in rows])},
          "labels": np.array([r["label"] for r in rows], np.int32),
          "mask": mask}


def batches(source, *, batch_size: int, train: bool, num_frames: int = 1,
            image_size: int = 224, seed: int = 0, epoch: int = 0,
            num_workers: int = 0, normalize: bool = False) -> Iterator[dict]:
  """One epoch of ``{"inputs": {"audio", "visual"}, "labels", "mask"}`` batches.

  Args:
    source: a random-access source (``load_prepared(...)[split]``).
    batch_size: examples per batch; every batch has this size (the last is
      padded, ``mask`` False on the padding; training drops it instead).
    train: augmentation and shuffling (seeded by ``seed`` and ``epoch``).
    num_frames: frames per clip (CREMA-D 1, Kinetics-Sounds and AVE 3).
    num_workers: grain worker processes (0: in this process).
    normalize: float32 frames normalised here instead of uint8 frames
      (normalised on the device by ``FrameEncoder``).
  """
  import grain
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.shuffle(seed=seed + 7919 * epoch)
    ds = ds.random_map(TrainTransform(num_frames, image_size, normalize),
                       seed=seed + 104729 * epoch)
  else:
    ds = ds.map(EvalTransform(num_frames, image_size, normalize))
  ds = ds.batch(batch_size, drop_remainder=train,
                batch_fn=lambda rows: _collate(rows, batch_size))
  it = ds.to_iter_dataset()
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  yield from it
