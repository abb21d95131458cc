"""Audio-visual digits on the real recordings: pairing, speaker-disjoint
splits, group-disjoint held-out rows, and a runner epoch on them."""

from __future__ import annotations

import numpy as np
import pytest

from arl_jax.data import av_digits
from arl_jax.data import fsdd
from arl_jax.data import splits as splits_lib
from arl_jax.data import uci_multifeature

needs_fsdd = pytest.mark.skipif(
    fsdd.default_root() is None, reason="no local FSDD copy (../shared/data/"
    "fsdd or ARL_JAX_FSDD)")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return tmp_path_factory.mktemp("fsdd_prepared")


@pytest.fixture(scope="module")
def real(prepared):
  return av_digits.load_audio_visual_digits(prepared_dir=prepared)


@needs_fsdd
def test_every_pair_agrees_and_speakers_never_cross_splits(real, prepared):
  counts = {s: len(y) for s, (_, y) in real.splits.items()}
  assert counts == {"train": 1200, "validation": 300, "test": 500}
  speakers = {s: set(g) for s, g in real.groups.items()}
  assert len(speakers["train"]) == 4
  assert len(speakers["validation"]) == len(speakers["test"]) == 1
  assert not speakers["train"] & speakers["test"]
  assert not speakers["train"] & speakers["validation"]
  assert not speakers["validation"] & speakers["test"]
  # Each pair holds one digit: rebuild the rows and compare the image's
  # label and the recording's label with the pair's.
  speech = fsdd.load(prepared)
  images, image_labels = uci_multifeature.read_view(
      uci_multifeature.default_root(), "pixel")
  rows = av_digits.pair(image_labels, speech.labels, speech.speakers, 0)
  used = np.concatenate([a for _, a in rows.values()])
  assert len(np.unique(used)) == len(used) == 2000     # distinct recordings
  used_images = np.concatenate([i for i, _ in rows.values()])
  assert len(np.unique(used_images)) == 2000           # every image once
  for split, (img, aud) in rows.items():
    np.testing.assert_array_equal(image_labels[img], speech.labels[aud])
    np.testing.assert_array_equal(real.splits[split][1], speech.labels[aud])
    np.testing.assert_array_equal(real.groups[split], speech.speakers[aud])
    assert np.all(np.bincount(speech.labels[aud], minlength=10)
                  == dict(zip(av_digits.SPLIT_NAMES,
                              av_digits.IMAGES_PER_DIGIT))[split])
  x, _ = real.splits["train"]
  assert x["audio"].shape == (1200, 43 * 31) and x["image"].shape == (1200, 240)
  np.testing.assert_allclose(x["audio"].mean(0), 0, atol=1e-4)   # train stats
  # The standardised audio of a pair is its recording's spectrogram.
  a = av_digits.pool_spectrograms(
      speech.spectrograms[rows["test"][1][:3]]).reshape(3, -1)
  np.testing.assert_allclose(
      real.splits["test"][0]["audio"][:3],
      (a - real.mean["audio"]) / real.std["audio"], rtol=1e-4, atol=1e-4)


@needs_fsdd
def test_pairing_is_deterministic_and_seeded(real, prepared):
  again = av_digits.load_audio_visual_digits(prepared_dir=prepared)
  other = av_digits.load_audio_visual_digits(prepared_dir=prepared, seed=1)
  for s in real.splits:
    np.testing.assert_array_equal(real.splits[s][1], again.splits[s][1])
    for m in ("audio", "image"):
      np.testing.assert_array_equal(real.splits[s][0][m],
                                    again.splits[s][0][m])
  assert set(other.groups["test"]) != set(real.groups["test"]) or not (
      np.array_equal(other.splits["test"][1], real.splits["test"][1]))


def test_pooling_is_a_block_mean():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 129, 63))
  got = av_digits.pool_spectrograms(x)
  assert got.shape == (2, 43, 31)
  np.testing.assert_allclose(got[1, 4, 7], x[1, 12:15, 14:16].mean(),
                             rtol=1e-5)


def test_pairing_refuses_too_few_recordings():
  labels = np.repeat(np.arange(2), 200)
  audio_labels = np.repeat(np.arange(2), 30)
  speakers = np.tile(np.repeat(["a", "b", "c"], 10), 2)
  with pytest.raises(ValueError, match="recordings for"):
    av_digits.pair(labels, audio_labels, speakers, 0)


def test_image_energy_removal_keeps_the_rest_of_the_variance():
  rng = np.random.default_rng(0)
  x = {"train": rng.normal(size=(300, 12)) @ np.diag(np.arange(12, 0, -1.0)),
       "test": rng.normal(size=(50, 12))}
  out = av_digits._remove_energy(x, 0.5)
  before = np.var(x["train"], 0).sum()
  after = np.var(out["train"], 0).sum()
  assert 0.2 < after / before <= 0.5 + 1e-6
  with pytest.raises(ValueError, match="image_energy_removed"):
    av_digits.assemble(np.zeros((1, 2)), [0], ["a"], np.zeros((1, 240)), [0],
                       image_energy_removed=1.0)


def test_group_holdout_takes_whole_groups():
  groups = np.repeat(["a", "b", "c", "d"], [30, 30, 30, 10])
  keep, held = splits_lib.group_holdout(groups, 0.25, seed=0)
  assert set(groups[keep]).isdisjoint(groups[held])
  assert len(keep) + len(held) == len(groups)
  assert sorted(np.concatenate([keep, held])) == list(range(len(groups)))
  share = len(held) / len(groups)
  assert abs(share - 0.25) <= 0.2        # whole groups: as close as they allow
  np.testing.assert_array_equal(held, splits_lib.group_holdout(
      groups, 0.25, seed=0)[1])
  with pytest.raises(ValueError, match="at least two groups"):
    splits_lib.group_holdout(np.array(["a"] * 5), 0.2, 0)
