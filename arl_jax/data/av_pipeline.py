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

``augment="device"``: the host only picks and decodes the frames, into a
zero-padded uint8 canvas (the data set's largest stored frame) with each
frame's size in ``batch["frame_hw"]``; the crop, flip and resize run in the
jitted step (:class:`arl_jax.data.FrameAugmentation`), with the same
distribution and filter. This is the fast path: per sample the host reads
one record and decodes one small JPEG, nothing else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from arl_jax._src import imagenet as _imagenet
from arl_jax.data.batching import pad_to_batch

try:
  import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - optional speed-up
  _simplejpeg = None

MEAN = np.array(_imagenet.MEAN, np.float32)
STD = np.array(_imagenet.STD, np.float32)


def _decode_rgb(frame) -> np.ndarray:
  """uint8 ``[H, W, 3]`` of a uint8 array, PIL image or encoded image bytes.

  With ``simplejpeg`` installed (the ``data`` extra) JPEG bytes are decoded
  straight into a NumPy array, 1.5-2x faster than PIL's decode-then-copy
  (the same libjpeg-turbo, the same pixels); other bytes go through PIL.
  """
  import io

  from PIL import Image
  if isinstance(frame, np.ndarray):
    return frame
  if not isinstance(frame, Image.Image):
    if _simplejpeg is not None:
      try:
        return _simplejpeg.decode_jpeg(bytes(frame), colorspace="RGB")
      except ValueError:   # not a JPEG (e.g. PNG): PIL below
        pass
    frame = Image.open(io.BytesIO(bytes(frame)))
  return np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"))


def _as_image(frame):
  """A PIL image from a PIL image, encoded image bytes or a uint8 array."""
  from PIL import Image
  if isinstance(frame, Image.Image):
    return frame
  return Image.fromarray(_decode_rgb(frame))


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


class HostAugmentation:
  """A clip's frames on the host (``augment="host"``), ``[T, S, S, 3]``.

  Train (called with an ``rng``): ``num_frames`` frames at random, each a
  random resized crop to ``image_size`` and a random horizontal flip.
  Evaluation (no ``rng``): evenly spaced frames resized to ``image_size``,
  deterministic. ``normalize``: float32 frames normalised here, else uint8.
  The device counterpart is :class:`arl_jax.data.FrameAugmentation`.
  """

  def __init__(self, num_frames: int, image_size: int = 224,
               normalize: bool = False):
    self.num_frames, self.image_size = num_frames, image_size
    self.normalize = normalize

  def __call__(self, example, rng: np.random.Generator | None = None):
    frames = _frames_of(example)
    idx = _frame_indices(len(frames), self.num_frames, rng)
    if rng is None:
      out = np.stack([_resize(frames[i], (self.image_size, self.image_size))
                      for i in idx])
    else:
      crops = []
      for i in idx:
        f = random_resized_crop(frames[i], self.image_size, rng)
        if rng.random() < 0.5:
          f = f[:, ::-1]
        crops.append(f)
      out = np.stack(crops)
    return {"audio": np.asarray(example["audio"], np.float32),
            "visual": _normalise(out) if self.normalize else out,
            "label": np.int32(example["label"])}


def _frame_indices(count: int, num_frames: int,
                   rng: np.random.Generator | None) -> np.ndarray:
  """Evenly spaced (``rng`` None) or random sorted frame indices."""
  if rng is None:
    return np.linspace(0, count - 1, num_frames).round().astype(int)
  return np.sort(rng.choice(count, num_frames, replace=count < num_frames))


class FrameChoice:
  """Which frames of a clip to use, still JPEG-encoded (``augment="device"``).

  Train (called with an ``rng``): ``num_frames`` frames at random; eval:
  evenly spaced; both as :class:`HostAugmentation` picks them. Decoding
  happens when the batch is assembled, straight into the batch array
  (:func:`_assemble_canvas`).
  """

  def __init__(self, num_frames: int):
    self.num_frames = num_frames

  def __call__(self, example, rng: np.random.Generator | None = None):
    frames = _frames_of(example)
    idx = _frame_indices(len(frames), self.num_frames, rng)
    return {"audio": example["audio"], "frames": [frames[i] for i in idx],
            "label": example["label"], "clip_id": example.get("clip_id", b"?")}


def _decode_into(out: np.ndarray, frame, clip) -> tuple[int, int]:
  """Decodes ``frame`` into the top-left corner of ``out`` [H_c, W_c, 3]."""
  if _simplejpeg is not None and isinstance(frame, (bytes, np.bytes_)):
    try:
      h, w = _simplejpeg.decode_jpeg_header(bytes(frame))[:2]
      if (h, w) == out.shape[:2]:          # fills the canvas: no copy
        _simplejpeg.decode_jpeg(bytes(frame), colorspace="RGB", buffer=out)
        return h, w
    except ValueError:   # not a JPEG: decoded below
      pass
  pixels = _decode_rgb(frame)
  h, w = pixels.shape[:2]
  if h > out.shape[0] or w > out.shape[1]:
    raise ValueError(
        f"clip {clip!r}: frame of {h}x{w} (h x w) does not fit the canvas "
        f"{out.shape[0]}x{out.shape[1]}; the canvas must be the data set's "
        "largest frame (data.frame_canvas(source)).")
  out[:h, :w] = pixels
  return h, w


def _assemble_canvas(rows: Sequence[dict], batch_size: int,
                     canvas: tuple[int, int]) -> dict:
  """The device-augmentation batch: frames decoded into one uint8 array."""
  rows, mask = pad_to_batch(rows, batch_size, rows[0])
  num_frames = len(rows[0]["frames"])
  visual = np.zeros((batch_size, num_frames) + tuple(canvas) + (3,), np.uint8)
  hw = np.empty((batch_size, num_frames, 2), np.int32)
  for i, r in enumerate(rows):
    for t, frame in enumerate(r["frames"]):
      hw[i, t] = _decode_into(visual[i, t], frame, r["clip_id"])
  return {"inputs": {"audio": np.stack([np.asarray(r["audio"], np.float32)
                                        for r in rows]),
                     "visual": visual},
          "labels": np.array([r["label"] for r in rows], np.int32),
          "mask": mask, "frame_hw": hw}


def _collate(examples: Sequence[dict], batch_size: int) -> dict:
  rows, mask = pad_to_batch(examples, batch_size, examples[0])
  return {"inputs": {"audio": np.stack([r["audio"] for r in rows]),
                     "visual": np.stack([r["visual"] for r in rows])},
          "labels": np.array([r["label"] for r in rows], np.int32),
          "mask": mask}


class _BatchLoader:
  """Batch ``b`` of an epoch: its records read, prepared and assembled.

  grain maps this over batch indices, so its per-element bookkeeping runs
  once per batch (it costs ~0.2 ms per element, a quarter of the fast path).
  Picklable (no lambdas) for grain worker processes.
  """

  def __init__(self, source, order, batch_size, per_example, assemble,
               shard=(0, 1)):
    self.source, self.order, self.batch_size = source, order, batch_size
    self.per_example, self.assemble = per_example, assemble
    # This process's contiguous rows of every global batch.
    self.local = batch_size // shard[1]
    self.offset = shard[0] * self.local

  def __call__(self, b: int, rng: np.random.Generator | None = None) -> dict:
    start = b * self.batch_size + self.offset
    idx = self.order[start:start + self.local]
    empty = len(idx) == 0     # past the end of the split: all padding
    if empty:
      idx = self.order[:1]
    records = [self.source[int(i)] for i in idx]
    if rng is None:
      rows = [self.per_example(r) for r in records]
    else:
      rows = [self.per_example(r, rng) for r in records]
    batch = self.assemble(rows, self.local)
    if empty:
      batch["mask"][:] = False
    return batch


def batches(source, *, batch_size: int, train: bool, num_frames: int = 1,
            image_size: int = 224, seed: int = 0, epoch: int = 0,
            num_workers: int = 0, normalize: bool = False,
            augment: str = "host", canvas: tuple[int, int] | None = None,
            read_threads: int = 0, shard_index: int = 0,
            shard_count: int = 1, first_batch: int = 0) -> Iterator[dict]:
  """One epoch of ``{"inputs": {"audio", "visual"}, "labels", "mask"}`` batches.

  Args:
    source: a random-access source (``load_prepared(...)[split]``).
    batch_size: examples per batch; every batch has this size (the last is
      padded, ``mask`` False on the padding; training drops it instead).
    train: augmentation and shuffling (seeded by ``seed`` and ``epoch``).
    num_frames: frames per clip (CREMA-D 1, Kinetics-Sounds and AVE 3).
    num_workers: grain worker processes (0: in this process).
    normalize: float32 frames normalised here instead of uint8 frames
      (normalised on the device by ``FrameEncoder``); host augmentation only.
    augment: ``"host"``: frames leave cropped, flipped and resized to
      ``image_size``. ``"device"``: frames leave decoded into a uint8 canvas
      plus ``batch["frame_hw"]``; the step applies
      ``FrameAugmentation(image_size).train`` / ``.eval`` (the fast path).
    canvas: (height, width) of the device canvas; default: the largest
      frame the data set stores (:func:`arl_jax.data.frame_canvas`).
    read_threads: grain prefetch threads in this process (0: none, the
      batches are made on the calling thread; decoding releases the GIL, so
      a few threads help when cores are free).
    shard_index, shard_count: with several processes (hosts), process
      ``shard_index`` of ``shard_count`` reads only its contiguous
      ``batch_size / shard_count`` rows of every global batch (the rows
      :func:`arl_jax.parallel.global_batch` expects from it); the shards
      are disjoint and together cover the split.
    first_batch: start at this batch of the epoch (the batches are those an
      uninterrupted epoch yields from there on: resuming mid-epoch).
  """
  import grain
  if augment not in ("host", "device"):
    raise ValueError(f"augment must be 'host' or 'device'; got {augment!r}.")
  if augment == "device" and normalize:
    raise ValueError("normalize=True needs augment='host': with "
                     "augment='device' frames are resized on the device and "
                     "normalised by the model.")
  if augment == "device" and canvas is None:
    from arl_jax.data.prepared import frame_canvas
    canvas = frame_canvas(source)
  if train:   # a plain permutation: grain's index_shuffle costs ~1 ms/read
    order = np.random.default_rng([seed, epoch]).permutation(len(source))
    num_batches = len(source) // batch_size
  else:
    order = np.arange(len(source))
    num_batches = -(-len(source) // batch_size)
  if augment == "device":
    per_example = FrameChoice(num_frames)
    assemble = functools.partial(_assemble_canvas, canvas=tuple(canvas))
  else:
    per_example = HostAugmentation(num_frames, image_size, normalize)
    assemble = _collate
  if not 0 <= shard_index < shard_count or batch_size % shard_count:
    raise ValueError(f"shard {shard_index} of {shard_count}: need 0 <= index "
                     f"< count and batch_size ({batch_size}) divisible by the "
                     "count.")
  loader = _BatchLoader(source, order, batch_size, per_example, assemble,
                        (shard_index, shard_count))
  ds = grain.MapDataset.range(num_batches)
  if train:
    ds = ds.random_map(loader, seed=seed + 104729 * epoch)
  else:
    ds = ds.map(loader)
  if first_batch:     # a resume mid-epoch: the same batches from there on
    ds = ds[first_batch:]
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(1, 2 * read_threads)))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  yield from it
