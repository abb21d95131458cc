"""The device-side crop/flip/resize against PIL, and the device pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from arl_jax.data import av_pipeline
from arl_jax.data import device_augment


def _images():
  rng = np.random.default_rng(0)
  noise = (rng.random((37, 53, 3)) * 255).astype(np.uint8)
  yy, xx = np.mgrid[0:37, 0:53]
  smooth = np.stack([yy * 6, xx * 4, (xx + yy) * 2], -1).astype(np.uint8)
  return {"noise": noise, "smooth": smooth}


@pytest.mark.parametrize("style", ["noise", "smooth"])
@pytest.mark.parametrize("box", [(0, 0, 37, 53), (3, 5, 20, 30), (10, 2, 8, 11),
                                 (1, 1, 36, 40)])
def test_resize_box_matches_pil_bilinear(style, box):
  """PIL's antialiased bilinear (uint8 rounding between its two passes: 1 level)."""
  img = _images()[style]
  canvas = np.full((45, 60, 3), 200, np.uint8)     # padding must not leak in
  canvas[:37, :53] = img
  top, left, h, w = box
  for size in (16, 24):
    ref = np.asarray(Image.fromarray(img).resize(
        (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    out = np.asarray(device_augment.resize_box(
        jnp.asarray(canvas), jnp.array([37, 53]), jnp.array(box, jnp.float32),
        size))
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    diff = np.abs(out.astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.5
    flipped = device_augment.resize_box(
        jnp.asarray(canvas), jnp.array([37, 53]), jnp.array(box, jnp.float32),
        size, flip=True)
    np.testing.assert_array_equal(np.asarray(flipped), out[:, ::-1])


def test_crop_boxes_inside_the_frame_with_the_host_distribution():
  hw = jnp.array([[256, 341], [100, 40], [2, 500]] * 2000, jnp.int32)
  boxes = np.asarray(device_augment.crop_boxes(jax.random.key(0), hw))
  h, w = np.asarray(hw, float).T
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + ch <= h).all() and (left + cw <= w).all() and (ch >= 1).all()
  assert np.array_equal(boxes, np.round(boxes))     # whole pixels
  # Frames where the range fits: area fraction in [0.08, 1], aspect in
  # [3/4, 4/3] up to rounding; the same mean area as the host sampler.
  big = np.arange(len(boxes)) % 3 == 0
  frac = (ch * cw / (h * w))[big]
  assert frac.min() >= 0.075 and frac.max() <= 1.0
  aspect = (cw / ch)[big]
  assert aspect.min() > 0.73 and aspect.max() < 1.37
  rng = np.random.default_rng(0)
  img = np.zeros((256, 341, 3), np.uint8)
  host = []
  for _ in range(2000):   # the host sampler's boxes, recovered from a marker
    box = _host_box(img.shape[:2], rng)
    host.append(box[2] * box[3] / (256 * 341))
  assert abs(frac.mean() - np.mean(host)) < 0.02
  # A 2 x 500 frame almost never fits: the central square fallback.
  thin = boxes[np.arange(len(boxes)) % 3 == 2]
  assert (thin[:, 2] <= 2).all()


def _host_box(hw, rng):
  """The box av_pipeline.random_resized_crop draws (same rule, same rng use)."""
  import math
  h, w = hw
  for _ in range(10):
    target = h * w * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)),
              ch, cw)
  side = min(h, w)
  return ((h - side) // 2, (w - side) // 2, side, side)


def _canvas_batch():
  imgs = list(_images().values())
  frames = np.zeros((2, 1, 40, 60, 3), np.uint8)
  hw = np.zeros((2, 1, 2), np.int32)
  for i, img in enumerate(imgs):
    frames[i, 0, :img.shape[0], :img.shape[1]] = img
    hw[i, 0] = img.shape[:2]
  return {"inputs": {"audio": np.zeros((2, 4, 5), np.float32), "visual": frames},
          "labels": np.array([0, 1], np.int32), "mask": np.ones(2, bool),
          "frame_hw": hw}, imgs


def test_frame_augmentation_eval_equals_host_eval():
  batch, imgs = _canvas_batch()
  aug = device_augment.FrameAugmentation(image_size=24)
  out = jax.jit(aug.eval)(batch)
  assert set(out) == {"inputs", "labels", "mask"}
  assert out["inputs"]["visual"].shape == (2, 1, 24, 24, 3)
  host = av_pipeline.HostAugmentation(1, 24)
  for i, img in enumerate(imgs):
    ref = host({"frames": [img], "audio": np.zeros(1), "label": 0})["visual"]
    diff = np.abs(np.asarray(out["inputs"]["visual"][i]).astype(int) - ref)
    assert diff.max() <= 1


def test_frame_augmentation_train_is_keyed_and_checks_its_input():
  batch, _ = _canvas_batch()
  aug = device_augment.FrameAugmentation(image_size=16)
  train = jax.jit(aug.train)
  a = train(batch, jax.random.key(1))
  b = train(batch, jax.random.key(1))
  c = train(batch, jax.random.key(2))
  np.testing.assert_array_equal(a["inputs"]["visual"], b["inputs"]["visual"])
  assert not np.array_equal(a["inputs"]["visual"], c["inputs"]["visual"])
  assert a["inputs"]["visual"].dtype == jnp.uint8 and "frame_hw" not in a
  no_hw = {k: v for k, v in batch.items() if k != "frame_hw"}
  with pytest.raises(ValueError, match="frame_hw"):
    aug.train(no_hw, jax.random.key(0))
  floats = {**batch, "inputs": {**batch["inputs"],
                                "visual": batch["inputs"]["visual"] / 255.0}}
  with pytest.raises(ValueError, match="uint8"):
    aug.eval(floats)
  with pytest.raises(ValueError, match="no modality 'video'"):
    device_augment.FrameAugmentation(modality="video").eval(batch)
