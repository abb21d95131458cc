import json
import pathlib
import re
import shutil
import warnings

import numpy as np
import pytest

from arl_jax import data
from arl_jax.data import audio
from arl_jax.data import av_pipeline
from arl_jax.data import layouts
from arl_jax.data import prepared
from arl_jax.data import uci_multifeature
from benchmarks import fake_data


@pytest.fixture(autouse=True)
def _tmpdir_env(tmp_path, monkeypatch):
  # TFDS leaves empty temp folders behind: keep them in the test's tmp dir.
  monkeypatch.setenv("TMPDIR", str(tmp_path))


# ------------------------------------------------------------- synthetic --

@pytest.mark.parametrize("make", [data.make_linear_gaussian,
                                  data.make_nonlinear_gaussian])
def test_synthetic_problem_has_known_optimum(make):
  p = make({"a": 0.7, "b": 1.5, "c": 3.0}, num_classes=5, dim=6,
           sizes=(100, 50, 4000))
  x, y = p.splits["test"]
  assert {m: v.shape for m, v in x.items()} == {m: (4000, 6) for m in "abc"}
  assert x["a"].dtype == np.float32 and y.dtype == np.int32
  assert p.bayes_accuracy > max(p.unimodal_bayes_accuracy.values())
  assert p.unimodal_bayes_accuracy["a"] > p.unimodal_bayes_accuracy["c"]
  w = p.optimal_weights
  assert w["a"] / w["b"] == pytest.approx((1.5 / 0.7) ** 2)
  assert sum(w.values()) == pytest.approx(1.0)
  # The same seed gives the same data and the same optimum.
  q = make({"a": 0.7, "b": 1.5, "c": 3.0}, num_classes=5, dim=6,
           sizes=(100, 50, 4000))
  np.testing.assert_array_equal(q.splits["train"][0]["b"], p.splits["train"][0]["b"])
  assert q.bayes_accuracy == p.bayes_accuracy


def test_nonlinear_flag_is_a_deprecated_alias_of_make_nonlinear_gaussian():
  args = ({"a": 0.7, "b": 1.5}, )
  kwargs = {"num_classes": 3, "dim": 4, "sizes": (20, 10, 30), "seed": 2}
  with pytest.warns(DeprecationWarning, match="make_nonlinear_gaussian"):
    old = data.make_linear_gaussian(*args, nonlinear=True, **kwargs)
  new = data.make_nonlinear_gaussian(*args, **kwargs)
  for split in ("train", "validation", "test"):
    for m in ("a", "b"):
      np.testing.assert_array_equal(old.splits[split][0][m],
                                    new.splits[split][0][m])
  assert old.bayes_accuracy == new.bayes_accuracy


def test_bayes_accuracy_agrees_with_monte_carlo_for_one_modality():
  # One informative modality plus a pure-noise one: Bayes accuracy for two
  # classes with means m1, m2 is Phi(||m1 - m2|| / (2 sigma)).
  from math import erf
  from math import sqrt
  p = data.make_linear_gaussian({"a": 1.0, "b": 1e3}, num_classes=2, dim=3,
                                sizes=(10, 10, 200000), seed=3)
  rng = np.random.default_rng(3)
  means = rng.normal(size=(2, 3))
  gap = np.linalg.norm(means[0] - means[1])
  exact = 0.5 * (1 + erf(gap / 2 / sqrt(2)))
  assert p.unimodal_bayes_accuracy["a"] == pytest.approx(exact, abs=0.005)


# ------------------------------------------------------------------- UCI --

def test_uci_multifeature_views_splits_and_standardisation():
  d = data.load_uci_multifeature(("profile", "morphological"), seed=1)
  sizes = {k: len(v[1]) for k, v in d.splits.items()}
  assert sizes == {"train": 1200, "validation": 400, "test": 400}
  for _name, (x, y) in d.splits.items():
    assert x["profile"].shape == (len(y), 216) and x["morphological"].shape[1] == 6
    assert np.all(np.bincount(y, minlength=10) == len(y) // 10)   # stratified
  x, _ = d.splits["train"]
  np.testing.assert_allclose(x["profile"].mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(x["morphological"].std(0), 1.0, atol=1e-3)
  again = data.load_uci_multifeature(("profile", "morphological"), seed=1)
  np.testing.assert_array_equal(again.splits["test"][0]["profile"],
                                d.splits["test"][0]["profile"])
  other = data.load_uci_multifeature(("profile",), seed=2)
  assert not np.allclose(other.splits["test"][0]["profile"],
                     d.splits["test"][0]["profile"])


def test_uci_bad_input(tmp_path):
  with pytest.raises(ValueError, match="unknown UCI Multiple Features view"):
    data.load_uci_multifeature(("colour",))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_uci_multifeature(("profile",), root=tmp_path / "nowhere")
  src = uci_multifeature.default_root()
  shutil.copytree(src, tmp_path / "uci")
  bad = tmp_path / "uci" / "mfeat-mor.csv"
  bad.write_text("\n".join(bad.read_text().splitlines()[:50]))
  with pytest.raises(ValueError, match="mfeat-mor.csv has shape"):
    data.load_uci_multifeature(("morphological",), root=tmp_path / "uci")


# ----------------------------------------------------------------- audio --

def test_log_spectrogram_shape_and_closed_form():
  n_fft, hop = 512, 353
  assert audio.log_spectrogram(np.zeros(66150), n_fft, hop).shape == (257, 188)
  k, amp = 40, 0.5                         # a tone exactly on bin k
  x = amp * np.cos(2 * np.pi * k * np.arange(66150) / n_fft)
  spec = np.exp(audio.log_spectrogram(x, n_fft, hop)) - 1e-7
  # Periodic Hann window: |X_k| = amp * n_fft / 4 away from the edges.
  np.testing.assert_allclose(spec[k, 5:-5], amp * n_fft / 4, rtol=1e-3)
  assert np.all(spec[k + 3, 5:-5] < 1e-2 * amp * n_fft / 4)


def test_wav_to_spectrogram_resamples_and_fills(tmp_path):
  fake_data.write_wav(tmp_path / "a.wav", 1.2, 2, np.random.default_rng(0))
  spec = audio.wav_to_spectrogram(tmp_path / "a.wav")
  assert spec.shape == (257, 188) and spec.dtype == np.float32
  assert np.all(np.isfinite(spec))
  (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
  with pytest.raises(audio.AudioError, match="bad.wav"):
    audio.wav_to_spectrogram(tmp_path / "bad.wav")


def test_the_audio_front_end_takes_arrays_as_well_as_files(tmp_path):
  fake_data.write_wav(tmp_path / "a.wav", 1.2, 2, np.random.default_rng(0))
  x, rate = audio.read_wav(tmp_path / "a.wav")
  from_file = audio.wav_to_spectrogram(tmp_path / "a.wav", frames=180)
  from_array = audio.samples_to_spectrogram(x, rate, frames=180)
  np.testing.assert_array_equal(from_array, from_file)
  # The same steps by hand (a user adding noise first uses the same path).
  by_hand = audio.log_spectrogram(audio.fill_window(
      audio.resample(x, rate, 22050), 66150))[:, :180]
  np.testing.assert_array_equal(from_array, by_hand)
  noisy = audio.samples_to_spectrogram(
      x + 0.01 * np.random.default_rng(1).normal(size=x.shape), rate)
  assert noisy.shape == (257, 188) and not np.allclose(noisy[:, :180],
                                                       from_file)
  for bad, match in ((np.zeros((10, 2)), "mono samples"),
                     (np.array([0.1, np.nan]), "NaN or Inf")):
    with pytest.raises(ValueError, match=match):
      audio.samples_to_spectrogram(bad, 8000)
  with pytest.raises(ValueError, match="positive sample rate"):
    audio.samples_to_spectrogram(x, 0)


def test_wav_cut_short_is_an_error_naming_the_file(tmp_path):
  from scipy.io import wavfile
  full = tmp_path / "full.wav"
  fake_data.write_wav(full, 0.5, 1, np.random.default_rng(0))   # 8000 samples
  wavfile.write(tmp_path / "stereo.wav", 8000, np.zeros((101, 2), np.float32))
  for name, declared in (("full.wav", 8000), ("stereo.wav", 101)):
    whole = (tmp_path / name).read_bytes()
    assert len(audio.read_wav(tmp_path / name)[0]) == declared
    cut = tmp_path / f"cut_{name}"
    for size in (len(whole) // 2, len(whole) - 1):
      cut.write_bytes(whole[:size])
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(audio.AudioError,
                           match=rf"WAV file {re.escape(str(cut))} is cut short:"
                                 rf" its header declares {declared} samples"):
          audio.read_wav(cut)
      assert not caught, [str(w.message) for w in caught]   # one message only


# ------------------------------------------------------- TFDS + pipeline --

@pytest.fixture(scope="module")
def crema(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("crema")
  root = fake_data.write_fake_crema_d(tmp / "raw")
  builder = data.prepare("crema_d", root, tmp / "prepared")
  return root, builder, data.load_prepared(builder.data_dir)


def test_crema_d_prepared_splits_shapes_and_labels(crema):
  root, builder, src = crema
  sizes = {k: len(v) for k, v in src.items()}
  # 48 clips: 12 listed for test; validation = 10% of each class of train,
  # at least one per class.
  assert sizes["test"] == 12 and sizes["train"] + sizes["validation"] == 36
  assert sizes["validation"] == 6
  val_labels = {src["validation"][i]["label"] for i in range(6)}
  assert val_labels == set(range(6))
  ex = src["train"][0]
  assert ex["audio"].shape == (257, 188) and ex["audio"].dtype == np.float32
  assert len(ex["frames"]) == 2 and isinstance(ex["frames"][0], bytes)  # JPEG
  decoded = data.load_prepared(builder.data_dir, decode_frames=True)["train"][0]
  assert decoded["frames"][0].dtype == np.uint8 and decoded["frames"][0].ndim == 3
  names = builder.info.features["label"].names
  assert names == list(layouts.CREMA_D_CLASSES)
  for split in ("train", "test"):
    for i in range(len(src[split])):
      e = src[split][i]
      clip = e["clip_id"].decode()
      assert names[e["label"]] == clip.split("_")[2]
  # The spectrogram is the one computed from the wav directly.
  e = src["test"][0]
  direct = audio.wav_to_spectrogram(root / "AudioWAV" / f"{e['clip_id'].decode()}.wav")
  np.testing.assert_allclose(e["audio"], direct, rtol=1e-6)


def test_pipeline_batches_are_deterministic_and_padded(crema):
  _, _, src = crema
  evals = list(av_pipeline.batches(src["test"], batch_size=5, train=False))
  assert len(evals) == 3 and evals[-1]["mask"].tolist() == [True, True, False,
                                                            False, False]
  b = evals[0]
  assert b["inputs"]["audio"].shape == (5, 257, 188)
  assert b["inputs"]["visual"].shape == (5, 1, 224, 224, 3)
  assert b["inputs"]["visual"].dtype == np.uint8 and b["labels"].dtype == np.int32
  normed = next(iter(av_pipeline.batches(src["test"], batch_size=5, train=False,
                                         normalize=True)))
  np.testing.assert_allclose(
      normed["inputs"]["visual"],
      ((b["inputs"]["visual"] / 255.0 - av_pipeline.MEAN) / av_pipeline.STD),
      rtol=1e-5, atol=1e-5)
  again = list(av_pipeline.batches(src["test"], batch_size=5, train=False))
  np.testing.assert_array_equal(again[0]["inputs"]["visual"], b["inputs"]["visual"])
  t1 = list(av_pipeline.batches(src["train"], batch_size=8, train=True, seed=3))
  t2 = list(av_pipeline.batches(src["train"], batch_size=8, train=True, seed=3))
  t3 = list(av_pipeline.batches(src["train"], batch_size=8, train=True, seed=3,
                                epoch=1))
  t4 = list(av_pipeline.batches(src["train"], batch_size=8, train=True, seed=4))
  n_train = len(src["train"])
  assert len(t1) == n_train // 8 and all(b["mask"].all() for b in t1)
  np.testing.assert_array_equal(t1[0]["inputs"]["visual"], t2[0]["inputs"]["visual"])
  # Rows identified by their spectrogram (no augmentation touches it).
  clips = {np.asarray(src["train"][i]["audio"], np.float32).tobytes(): i
           for i in range(n_train)}
  order = lambda bs: [clips[a.astype(np.float32).tobytes()]
                      for b in bs for a in b["inputs"]["audio"]]
  o1, o3, o4 = order(t1), order(t3), order(t4)
  for o in (o1, o3, o4):       # each epoch: distinct rows of the split
    assert len(o) == len(set(o)) == 8 * (n_train // 8)
  assert o1 != o3 and o1 != o4  # epoch and seed each change the order
  # Evaluation: exactly the split's rows and labels, in order.
  ev = [(int(l), a.astype(np.float32).tobytes())
        for b in evals for l, a, k in zip(b["labels"], b["inputs"]["audio"],
                                          b["mask"]) if k]
  want = [(int(src["test"][i]["label"]),
           np.asarray(src["test"][i]["audio"], np.float32).tobytes())
          for i in range(len(src["test"]))]
  assert ev == want


def test_prepared_source_reads_what_tfds_decodes(crema):
  """The direct proto parse gives TFDS's own decoding, record for record."""
  import io

  import tensorflow_datasets as tfds
  from PIL import Image
  _, builder, src = crema
  assert isinstance(src["train"], prepared.PreparedSource)
  reference = tfds.builder_from_directory(str(builder.data_dir)).as_data_source()
  for split in ("train", "test"):
    assert len(src[split]) == len(reference[split])
    for i in range(len(src[split])):
      fast, ref = src[split][i], reference[split][i]
      np.testing.assert_array_equal(fast["audio"], ref["audio"])
      assert fast["label"] == ref["label"] and fast["clip_id"] == ref["clip_id"]
      assert len(fast["frames"]) == len(ref["frames"])
      for jpeg, pixels in zip(fast["frames"], ref["frames"]):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(jpeg))),
                                      pixels)
  batch = src["train"].__getitems__([2, 0])
  assert [b["clip_id"] for b in batch] == [src["train"][2]["clip_id"],
                                           src["train"][0]["clip_id"]]


def test_records_are_stored_uncompressed_and_frames_measured(crema, tmp_path):
  from array_record.python import array_record_module as ar
  root, builder, src = crema
  path = pathlib.Path(builder.data_dir)
  assert (path / prepared._UNCOMPRESSED_MARK).exists()
  shard = next(path.glob("*train.array_record*"))
  before = shard.read_bytes()
  prepared.store_uncompressed(path)           # a no-op the second time
  assert shard.read_bytes() == before
  # Uncompressed: the spectrogram bytes appear verbatim in the file.
  assert src["train"][0]["audio"].tobytes()[:4096] in before
  assert ar.ArrayRecordReader(str(shard)).num_records() == len(src["train"])
  # The largest stored frame is recorded: the fake frames are 48 x 64.
  assert data.frame_canvas(src["train"]) == (48, 64)
  # A data set prepared before it was recorded: the error says what to do.
  old = shutil.copytree(path, tmp_path / "old")
  (old / "metadata.json").unlink()
  with pytest.raises(data.DataError, match="prepare it again"):
    data.frame_canvas(data.load_prepared(old)["train"])


def test_decoding_without_simplejpeg_gives_the_same_batches(crema, monkeypatch):
  _, _, src = crema
  kwargs = dict(batch_size=4, train=True, seed=5)
  fast = [list(av_pipeline.batches(src["train"], augment=a, **kwargs))
          for a in ("device", "host")]
  monkeypatch.setattr(av_pipeline, "_simplejpeg", None)   # PIL only
  for a, batches in zip(("device", "host"), fast):
    slow = list(av_pipeline.batches(src["train"], augment=a, **kwargs))
    for x, y in zip(batches, slow):
      np.testing.assert_array_equal(x["inputs"]["visual"], y["inputs"]["visual"])


def test_device_pipeline_decodes_into_the_canvas(crema):
  import jax
  _, _, src = crema
  test = src["test"]
  dev = list(av_pipeline.batches(test, batch_size=5, train=False,
                                 augment="device"))
  host = list(av_pipeline.batches(test, batch_size=5, train=False))
  assert len(dev) == len(host)
  b = dev[0]
  assert b["inputs"]["visual"].shape == (5, 1, 48, 64, 3)
  assert b["inputs"]["visual"].dtype == np.uint8
  assert b["frame_hw"].tolist() == [[[48, 64]]] * 5
  aug = data.FrameAugmentation(image_size=224)
  for d, h in zip(dev, host):
    out = jax.jit(aug.eval)(d)
    np.testing.assert_array_equal(out["labels"], h["labels"])
    np.testing.assert_array_equal(out["mask"], h["mask"])
    diff = np.abs(np.asarray(out["inputs"]["visual"]).astype(int)
                  - h["inputs"]["visual"])
    assert diff.max() <= 1
  # Train: deterministic per (seed, epoch); a larger canvas pads with zeros.
  t1 = next(av_pipeline.batches(src["train"], batch_size=4, train=True, seed=1,
                                augment="device"))
  t2 = next(av_pipeline.batches(src["train"], batch_size=4, train=True, seed=1,
                                augment="device", canvas=(50, 70)))
  np.testing.assert_array_equal(t2["inputs"]["visual"][:, :, :48, :64],
                                t1["inputs"]["visual"])
  assert not t2["inputs"]["visual"][:, :, 48:].any()
  # Worker processes and prefetch threads give the same batches.
  inline = list(av_pipeline.batches(src["train"], batch_size=4, train=True,
                                    augment="device", seed=2))
  for kwargs in ({"num_workers": 1}, {"read_threads": 2}):
    other = list(av_pipeline.batches(src["train"], batch_size=4, train=True,
                                     augment="device", seed=2, **kwargs))
    assert len(other) == len(inline)
    for x, y in zip(inline, other):
      np.testing.assert_array_equal(x["inputs"]["visual"], y["inputs"]["visual"])
      np.testing.assert_array_equal(x["labels"], y["labels"])
  with pytest.raises(ValueError, match="does not fit the canvas"):
    next(av_pipeline.batches(test, batch_size=2, train=False, augment="device",
                             canvas=(40, 64)))
  with pytest.raises(ValueError, match="augment must be"):
    next(av_pipeline.batches(test, batch_size=2, train=False, augment="gpu"))


def test_crema_d_actor_disjoint_split(tmp_path):
  root = fake_data.write_fake_crema_d(tmp_path / "raw",
                                     actors=tuple(range(1001, 1011)),
                                     sentences=("DFA",), frames=1)
  b = data.prepare("crema_d", root, tmp_path / "p", config="actor_disjoint")
  src = data.load_prepared(b.data_dir)
  actors = {s: {src[s][i]["clip_id"].decode().split("_")[0]
                for i in range(len(src[s]))} for s in src}
  assert actors["train"].isdisjoint(actors["test"])
  assert actors["train"].isdisjoint(actors["validation"])
  assert actors["validation"].isdisjoint(actors["test"])
  counts = tuple(len(actors[s]) for s in ("train", "validation", "test"))
  assert counts == (7, 1, 2)


def test_kinetics_sounds_and_ave_layouts(tmp_path):
  ks = data.prepare("kinetics_sounds", fake_data.write_fake_kinetics_sounds(
      tmp_path / "ks"), tmp_path / "p")
  src = data.load_prepared(ks.data_dir)
  assert {k: len(v) for k, v in src.items()} == {"train": 9, "validation": 3,
                                                 "test": 6}
  assert src["train"][0]["audio"].shape == (257, 1004)
  batch = next(iter(av_pipeline.batches(src["train"], batch_size=4, train=True,
                                        num_frames=3)))
  assert batch["inputs"]["visual"].shape == (4, 3, 224, 224, 3)
  ave = data.prepare("ave", fake_data.write_fake_ave(tmp_path / "ave"),
                     tmp_path / "p")
  src = data.load_prepared(ave.data_dir)
  assert {k: len(v) for k, v in src.items()} == {"train": 12, "validation": 3,
                                                 "test": 6}
  assert ave.info.features["label"].num_classes == 28


@pytest.mark.parametrize("damage,match", [
    ("no_audio", r"audio file .*1001_DFA_NEU_XX.wav is missing"),
    ("no_frames", r"no frames .*Image-01-FPS/1001_DFA_NEU_XX"),
    ("bad_wav", r"cannot read WAV file .*1001_DFA_NEU_XX.wav"),
    ("bad_jpg", r"cannot read image .*1001_DFA_NEU_XX/000.jpg"),
    ("cut_wav", r"WAV file .*1001_DFA_NEU_XX.wav is cut short: its header "
                r"declares 8000 samples \(0.5 s at 16000 Hz\), the file holds"),
    ("bad_label", r"clip '1001_DFA_NEU_XX' \(.*(train|test).csv, line \d+\) "
                  r"has unknown label 'CALM'"),
])
def test_bad_clips_are_named_or_skipped_and_reported(tmp_path, damage, match):
  root = fake_data.write_fake_crema_d(tmp_path / "raw", sentences=("DFA",),
                                     frames=1, seconds=0.5)
  clip = "1001_DFA_NEU_XX"
  listed = "train.csv" if clip in (root / "train.csv").read_text() else "test.csv"
  if damage == "no_audio":
    (root / "AudioWAV" / f"{clip}.wav").unlink()
  elif damage == "no_frames":
    shutil.rmtree(root / "Image-01-FPS" / clip)
  elif damage == "bad_wav":
    (root / "AudioWAV" / f"{clip}.wav").write_bytes(b"not a wav file")
  elif damage == "bad_jpg":
    (root / "Image-01-FPS" / clip / "000.jpg").write_bytes(b"\xff\xd8garbage")
  elif damage == "cut_wav":     # e.g. an interrupted copy: half the file
    wav = root / "AudioWAV" / f"{clip}.wav"
    wav.write_bytes(wav.read_bytes()[:wav.stat().st_size // 2])
  else:
    path = root / listed
    path.write_text(path.read_text().replace(f"{clip},NEU", f"{clip},CALM"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(data.DataError, match=match):
      data.prepare("crema_d", root, tmp_path / "strict")
    b = data.prepare("crema_d", root, tmp_path / "lenient", skip_invalid=True)
  # One clear message naming the file, no library warning that names none.
  assert not [w for w in caught if "EOF" in str(w.message)]
  report = json.loads((pathlib.Path(b.data_dir) / "prepare_report.json").read_text())
  assert [r["clip_id"] for r in report["skipped"]] == [clip]
  assert re.search(match, report["skipped"][0]["reason"])
  src = data.load_prepared(b.data_dir)
  assert sum(len(v) for v in src.values()) == 23
  clips = {src[s][i]["clip_id"].decode() for s in src for i in range(len(src[s]))}
  assert clip not in clips
  if damage == "bad_label":     # a wrong label list is not a few bad clips
    path = root / listed
    path.write_text(re.sub(r",\w+$", ",CALM", path.read_text(), flags=re.M))
    with pytest.raises(data.DataError,
                       match=r"no clip of split '\w+' has a known label"):
      data.prepare("crema_d", root, tmp_path / "wrong", skip_invalid=True)


@pytest.mark.parametrize("name,title,needs", [
    ("crema_d", "CREMA-D", ("AudioWAV/", "Image-01-FPS/", "train.csv",
                            "test.csv")),
    ("kinetics_sounds", "Kinetics-Sounds", ("audio/", "frames/", "classes.txt",
                                            "train.csv", "test.csv")),
    ("ave", "AVE", ("audio/", "frames/", "trainSet.txt", "testSet.txt")),
])
def test_folder_without_the_layout_says_what_it_needs(tmp_path, capfd, name,
                                                      title, needs):
  root = tmp_path / "copy"
  root.mkdir()
  for extra in (None, "videos"):     # empty, then a folder of something else
    if extra:
      (root / extra).mkdir()
    with pytest.raises(data.DataError) as e:
      data.prepare(name, root, tmp_path / "p")
    message = str(e.value)
    assert message.startswith(f"data root {root} does not have the {title} "
                              f"layout: missing {', '.join(needs)}.")
    assert all(f"\n  {n}" in message for n in needs)   # one line each
    assert "Downloading" not in capfd.readouterr().out    # before TFDS starts
  (root / needs[0]).mkdir()            # a partial copy: only the rest missing
  with pytest.raises(data.DataError,
                     match=f"layout: missing {', '.join(needs[1:])}."):
    data.prepare(name, root, tmp_path / "p")


def test_prepared_data_set_is_reused_without_its_copy(crema, tmp_path):
  _, builder, _ = crema
  prepared = pathlib.Path(builder.data_dir).parents[2]
  (tmp_path / "gone").mkdir()
  again = data.prepare("crema_d", tmp_path / "gone", prepared)
  assert again.data_dir == builder.data_dir


def test_damaged_prepared_file_is_named(crema, tmp_path):
  _, builder, _ = crema
  path = shutil.copytree(builder.data_dir, tmp_path / "prepared")
  shard = next(path.glob("*-train.array_record-*"))
  size = shard.stat().st_size
  with open(shard, "r+b") as f:          # damage in the middle, same size
    f.seek(size // 2)
    f.write(b"\0" * 64)
  assert shard.stat().st_size == size
  match = (rf"prepared data file {re.escape(str(shard))} is damaged or "
           rf"unreadable \(record \d+: .*mismatch.*\)\. Delete the prepared "
           rf"data set {re.escape(str(path))} and prepare it again")
  src = data.load_prepared(path)         # the files' indices are intact
  with pytest.raises(data.DataError, match=match) as e:
    for _ in av_pipeline.batches(src["train"], batch_size=4, train=False):
      pass
  assert e.value.__cause__ is None and e.value.__suppress_context__
  with pytest.raises(data.DataError, match=match):
    src["train"].__getitems__(list(range(len(src["train"]))))
  decoded = data.load_prepared(path, decode_frames=True)["train"]
  with pytest.raises(data.DataError, match=match):
    [decoded[i] for i in range(len(decoded))]
  # A file cut short is found when the data set is loaded.
  test = next(path.glob("*-test.array_record-*"))
  test.write_bytes(test.read_bytes()[:test.stat().st_size // 2])
  with pytest.raises(data.DataError,
                     match=rf"prepared data file {re.escape(str(test))} is "
                           rf"damaged or unreadable .*Delete the prepared "
                           rf"data set {re.escape(str(path))}"):
    data.load_prepared(path)


def test_missing_root_and_unprepared_dir(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.prepare("crema_d", tmp_path / "nowhere", tmp_path / "p")
  with pytest.raises(data.DataError, match="not a prepared data set"):
    data.load_prepared(tmp_path)
  with pytest.raises(ValueError, match="unknown data set"):
    data.prepare("audioset", tmp_path, tmp_path / "p")


def test_in_memory_batches_permute_every_epoch_and_evaluate_in_order():
  from arl_jax.data import iterate_batches
  n = 50
  x = {"a": np.arange(n, dtype=np.float32)[:, None]}
  y = (np.arange(n) % 3).astype(np.int32)
  rows = lambda bs: [int(v) for b in bs for v in b["inputs"]["a"][b["mask"], 0]]
  train = lambda seed, epoch: rows(iterate_batches(
      x, y, 8, shuffle=True, seed=seed, epoch=epoch, drop_last=True))
  e0, e1, s1 = train(0, 0), train(0, 1), train(1, 0)
  for o in (e0, e1, s1):
    assert len(o) == len(set(o)) == 48 and set(o) <= set(range(n))
  assert e0 != e1 and e0 != s1 and train(0, 0) == e0
  ev = list(iterate_batches(x, y, 8))
  assert rows(ev) == list(range(n))
  assert [int(l) for b in ev for l in b["labels"][b["mask"]]] == y.tolist()
  assert all(b["labels"].shape == (8,) for b in ev)
