"""The Free Spoken Digit Dataset: the checksum list, the front end, the
messages for a damaged copy, and the builder on the real recordings."""

from __future__ import annotations

import os
import pathlib
import re
import struct
import time

import numpy as np
import pytest

from arl_jax import data
from arl_jax.data import audio
from arl_jax.data import fsdd
from arl_jax.data.layouts import DataError

ROOT = fsdd.default_root()
needs_fsdd = pytest.mark.skipif(
    ROOT is None, reason="no local FSDD copy: ../shared/data/fsdd (next to the "
    "working directory or the repository) is missing and ARL_JAX_FSDD is unset")


def reference_log_spectrogram(x, n_fft=256, hop=128):
  """Independent float64 STFT: centred frames, periodic Hann, log(|S| + 1e-7)."""
  x = np.concatenate([np.zeros(n_fft // 2), np.asarray(x, np.float64),
                      np.zeros(n_fft // 2)])
  window = np.sin(np.pi * np.arange(n_fft) / n_fft) ** 2   # periodic Hann
  frames = np.array([x[s:s + n_fft] * window
                     for s in range(0, len(x) - n_fft + 1, hop)])
  return np.log(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-7)


def link_copy(tmp_path) -> pathlib.Path:
  """A copy of the shared FSDD: recordings/ of symbolic links to its files."""
  root = tmp_path / "fsdd"
  (root / "recordings").mkdir(parents=True)
  for path in (ROOT / "recordings").iterdir():
    os.symlink(path, root / "recordings" / path.name)
  return root


def replace(root, name, content: bytes) -> pathlib.Path:
  """Puts a real file holding ``content`` in place of a recording's link."""
  path = root / "recordings" / name
  path.unlink()
  path.write_bytes(content)
  return path


def real_bytes(name) -> bytes:
  return (ROOT / "recordings" / name).read_bytes()


# ---------------------------------------------------------- checksum list --

@needs_fsdd
def test_checksum_list_matches_the_shared_copy():
  files = fsdd.verify(ROOT)
  names = [p.name for p in files]
  assert len(files) == fsdd.NUM_RECORDINGS == 3000
  assert names == sorted(names) == list(fsdd.checksums())
  assert fsdd.aggregate_sha256(ROOT) == fsdd.AGGREGATE_SHA256
  # SOURCE.md's aggregate, as written there.
  source = (ROOT / "SOURCE.md").read_text()
  assert fsdd.AGGREGATE_SHA256 in source
  expected = {fsdd.file_name(d, s, i) for d in range(fsdd.DIGITS)
              for s in fsdd.SPEAKERS for i in range(fsdd.RECORDINGS_PER)}
  assert set(names) == expected
  assert list(fsdd.SPEAKERS) == sorted(fsdd.SPEAKERS)
  assert fsdd.parse_name("7_jackson_32.wav") == (7, "jackson", 32)


def test_default_root_prefers_the_environment_variable(monkeypatch, tmp_path):
  monkeypatch.setenv(fsdd.ENV_VAR, str(tmp_path / "elsewhere"))
  assert fsdd.default_root() == tmp_path / "elsewhere"
  monkeypatch.delenv(fsdd.ENV_VAR)
  monkeypatch.chdir(tmp_path)       # no ../shared/data/fsdd next to it
  repo_copy = pathlib.Path(fsdd.__file__).resolve().parents[2] / (
      "../shared/data/fsdd")
  want = repo_copy.resolve() if repo_copy.is_dir() else None
  assert fsdd.default_root() == want


# -------------------------------------------------------------- front end --

def test_spectrogram_pads_short_signals_with_silence_at_the_end():
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.5, 0.5, 3000).astype(np.float32)
  spec = fsdd.spectrogram(x, 8000)
  assert spec.shape == fsdd.SPECTROGRAM_SHAPE == (129, 63)
  assert spec.dtype == np.float32 and np.isfinite(spec).all()
  padded = np.concatenate([x, np.zeros(5000, np.float32)])
  np.testing.assert_array_equal(spec, fsdd.spectrogram(padded, 8000))
  np.testing.assert_allclose(spec, reference_log_spectrogram(padded),
                             rtol=0, atol=2e-3)
  # The end is silence: the frames past the signal hold log(1e-7).
  assert np.all(spec[:, -5:] == np.float32(np.log(1e-7)))


def test_spectrogram_crops_long_signals_to_their_first_second():
  rng = np.random.default_rng(1)
  x = rng.uniform(-0.5, 0.5, 12000).astype(np.float32)
  spec = fsdd.spectrogram(x, 8000)
  assert spec.shape == (129, 63)
  np.testing.assert_allclose(spec, reference_log_spectrogram(x[:8000]),
                             rtol=0, atol=2e-3)
  y = x.copy()
  y[8000:] = 0.9                    # what follows the first second is unused
  np.testing.assert_array_equal(fsdd.spectrogram(y, 8000), spec)


def test_spectrogram_resamples_to_8_khz_and_rejects_non_mono():
  rng = np.random.default_rng(2)
  x = rng.uniform(-0.5, 0.5, 16000).astype(np.float32)
  np.testing.assert_array_equal(fsdd.spectrogram(x, 16000),
                                fsdd.spectrogram(audio.resample(x, 16000, 8000)))
  with pytest.raises(ValueError, match="mono"):
    fsdd.spectrogram(np.zeros((100, 2), np.float32))
  with pytest.raises(ValueError, match="mono"):
    fsdd.spectrogram(np.zeros(0, np.float32))


@needs_fsdd
def test_spectrogram_of_real_recordings_short_and_long():
  short = ROOT / "recordings" / "0_george_0.wav"      # 0.30 s
  long = ROOT / "recordings" / "9_theo_16.wav"        # 2.28 s, the longest
  for path in (short, long):
    x, rate = audio.read_wav(path)
    assert rate == 8000
    spec = fsdd.wav_spectrogram(path)
    assert spec.shape == (129, 63) and spec.dtype == np.float32
    assert np.isfinite(spec).all()
    window = np.pad(x[:8000].astype(np.float64), (0, max(0, 8000 - len(x))))
    np.testing.assert_allclose(spec, reference_log_spectrogram(window),
                               rtol=0, atol=2e-3)
  assert len(audio.read_wav(long)[0]) > 8000 > len(audio.read_wav(short)[0])


# ---------------------------------------------------------- damaged copies --

def _truncated(root):
  return replace(root, "3_lucas_7.wav", real_bytes("3_lucas_7.wav")[:2000])


def _emptied(root):
  return replace(root, "5_nicolas_12.wav", b"")


def _no_samples(root):
  head = bytearray(real_bytes("0_george_0.wav")[:44])   # a canonical header
  head[4:8] = struct.pack("<I", 36)
  head[40:44] = struct.pack("<I", 0)
  return replace(root, "0_george_0.wav", bytes(head))


def _flipped(root):
  content = bytearray(real_bytes("8_yweweler_40.wav"))
  for i in range(1000, 1008):                        # inside the samples
    content[i] ^= 0xFF
  return replace(root, "8_yweweler_40.wav", bytes(content))


@needs_fsdd
@pytest.mark.parametrize("damage, problem", [
    (_truncated, r"is cut short: its header declares"),
    (_emptied, r"is empty \(0 bytes\)"),
    (_no_samples, r"holds no samples"),
    (_flipped, r"is modified or damaged: its SHA-256 is [0-9a-f]{64}, "
               r"FSDD's is [0-9a-f]{64}"),
])
def test_a_damaged_recording_is_named_with_its_problem(tmp_path, damage,
                                                       problem):
  root = link_copy(tmp_path)
  path = damage(root)
  with pytest.raises(DataError) as e:
    fsdd.verify(root)
  assert re.search(re.escape(str(path)) + r":? " + problem, str(e.value)), (
      str(e.value))
  assert "1 FSDD recording(s)" in str(e.value)


@needs_fsdd
def test_every_damaged_recording_is_listed(tmp_path):
  root = link_copy(tmp_path)
  paths = [_truncated(root), _emptied(root), _flipped(root)]
  with pytest.raises(DataError, match="3 FSDD recording") as e:
    fsdd.verify(root)
  for path in paths:
    assert str(path) in str(e.value)


@needs_fsdd
def test_an_unknown_file_is_named(tmp_path):
  root = link_copy(tmp_path)
  (root / "recordings" / "foo.wav").write_bytes(real_bytes("1_theo_3.wav"))
  (root / "recordings" / "1_theo_50.wav").write_bytes(b"")   # index 0-49
  with pytest.raises(DataError, match=r"2 file\(s\) that are not FSDD "
                     r"recordings: 1_theo_50.wav, foo.wav\.") as e:
    fsdd.verify(root)
  assert "speaker one of george, jackson, lucas" in str(e.value)


@needs_fsdd
def test_missing_recordings_are_counted_and_named(tmp_path):
  root = link_copy(tmp_path)
  (root / "recordings" / "3_theo_7.wav").unlink()
  with pytest.raises(DataError, match=r"1 of the 3000 FSDD recordings are "
                     r"missing from .*recordings: 3_theo_7.wav\."):
    fsdd.verify(root)
  for name in ("0_jackson_1.wav", "0_jackson_2.wav", "0_jackson_3.wav",
               "0_jackson_4.wav", "0_jackson_5.wav", "0_jackson_6.wav"):
    (root / "recordings" / name).unlink()
  with pytest.raises(DataError, match=r"7 of the 3000 .*: 0_jackson_1.wav, "
                     r".*\(2 more\)"):
    fsdd.verify(root)


def test_missing_root_or_recordings_folder_is_named(tmp_path):
  with pytest.raises(DataError, match=f"FSDD root {tmp_path / 'nope'} does "
                     "not exist.*ARL_JAX_FSDD"):
    fsdd.verify(tmp_path / "nope")
  (tmp_path / "fsdd").mkdir()
  (tmp_path / "fsdd" / "README.md").write_text("no recordings here")
  with pytest.raises(DataError, match=f"FSDD root {tmp_path / 'fsdd'} has no "
                     "recordings/ folder"):
    fsdd.verify(tmp_path / "fsdd")
  with pytest.raises(DataError, match="has no recordings/ folder"):
    fsdd.aggregate_sha256(tmp_path / "fsdd")


# ------------------------------------------------------- builder, prepare --

@pytest.fixture(scope="module")
def prepared_fsdd(tmp_path_factory):
  if ROOT is None:
    pytest.skip("no local FSDD copy (../shared/data/fsdd, ARL_JAX_FSDD)")
  tmp = tmp_path_factory.mktemp("fsdd_prepared")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TMPDIR", str(tmp))   # TFDS leaves empty temp folders behind
    start = time.perf_counter()
    builder = fsdd.prepare(tmp / "data", ROOT)   # 2.3 s on 2 cores
    seconds = time.perf_counter() - start
    arrays = fsdd.load(tmp / "data")
  return builder, arrays, seconds, tmp / "data"


def test_prepare_writes_every_recording_once(prepared_fsdd):
  builder, arrays, seconds, _ = prepared_fsdd
  assert seconds < 40, f"preparing FSDD took {seconds:.1f} s"
  assert builder.info.splits["train"].num_examples == 3000
  assert list(builder.info.splits) == ["train"]
  shards = list(pathlib.Path(builder.data_dir).glob("*.array_record-*"))
  assert shards and (pathlib.Path(builder.data_dir)
                     / ".records_uncompressed").exists()
  assert len(arrays) == 3000
  assert arrays.spectrograms.shape == (3000, 129, 63)
  assert arrays.spectrograms.dtype == np.float32
  assert np.isfinite(arrays.spectrograms).all()
  assert arrays.labels.dtype == np.int32 and arrays.indices.dtype == np.int32
  assert arrays.speakers.shape == (3000,) and arrays.speakers.dtype.kind == "U"
  assert list(arrays.file_names) == sorted(arrays.file_names) == list(
      fsdd.checksums())
  for k, name in enumerate(arrays.file_names):
    digit, speaker, index = fsdd.parse_name(name)
    assert (arrays.labels[k], arrays.speakers[k], arrays.indices[k]) == (
        digit, speaker, index), name
  assert tuple(sorted(set(arrays.speakers))) == fsdd.SPEAKERS
  assert np.bincount(arrays.labels).tolist() == [300] * 10
  # The stored spectrograms are the front end's, bit for bit.
  for k in (0, 1234, 2999):
    path = ROOT / "recordings" / arrays.file_names[k]
    np.testing.assert_array_equal(arrays.spectrograms[k],
                                  fsdd.wav_spectrogram(path))


def test_load_reads_what_tfds_decodes(prepared_fsdd):
  builder, arrays, _, _ = prepared_fsdd
  source = builder.as_data_source()["train"]
  row = {name: k for k, name in enumerate(arrays.file_names)}
  for i in (0, 17, 2999):
    ex = source[i]
    k = row[ex["file_name"].decode()]
    np.testing.assert_array_equal(ex["spectrogram"], arrays.spectrograms[k])
    assert ex["label"] == arrays.labels[k] and ex["index"] == arrays.indices[k]
    assert ex["speaker"].decode() == arrays.speakers[k]


def test_a_second_prepare_reuses_the_copy_and_loads_the_same(prepared_fsdd,
                                                             monkeypatch):
  builder, arrays, _, data_dir = prepared_fsdd
  shard = next(pathlib.Path(builder.data_dir).glob("*.array_record-*"))
  before = shard.stat().st_mtime_ns
  monkeypatch.setattr(fsdd, "default_root", lambda: None)   # root not needed
  start = time.perf_counter()
  again = fsdd.prepare(data_dir)
  assert time.perf_counter() - start < 5
  assert again.data_dir == builder.data_dir
  assert shard.stat().st_mtime_ns == before
  second = data.load_fsdd(data_dir)
  np.testing.assert_array_equal(second.spectrograms, arrays.spectrograms)
  np.testing.assert_array_equal(second.labels, arrays.labels)
  np.testing.assert_array_equal(second.speakers, arrays.speakers)
  np.testing.assert_array_equal(second.indices, arrays.indices)
  assert second.file_names == arrays.file_names
  assert data.prepare_fsdd is fsdd.prepare


def test_prepare_needs_a_root_and_checks_it_first(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(fsdd, "default_root", lambda: None)
  with pytest.raises(DataError, match="pass root= .* or set ARL_JAX_FSDD"):
    fsdd.prepare(tmp_path / "data")
  with pytest.raises(DataError, match="does not exist"):
    fsdd.prepare(tmp_path / "data", tmp_path / "nope")
  assert not list((tmp_path / "data").glob("spoken_digits/*/*.array_record*"))
