"""Audio preprocessing: WAV reading, resampling and the log-magnitude STFT.

The spectrogram follows the reference preprocessing of CREMA-D: load at
22.05 kHz, repeat the clip to fill the window (3 s), clip to [-1, 1], STFT
with ``n_fft=512``, ``hop=353``, a periodic Hann window, centred frames with
zero padding (librosa's ``stft`` defaults), then ``log(|S| + 1e-7)``: a
257 x 188 array for 3 s.
"""

from __future__ import annotations

import math
import os
import pathlib
import struct
import warnings

import numpy as np


class AudioError(ValueError):
  """A WAV file that cannot be read (names the file)."""


def _wav_frames(path: pathlib.Path) -> tuple[int, int, int] | None:
  """(samples the header declares, samples the file holds, rate) of a WAV.

  The declared count is the ``data`` chunk's size over the ``fmt `` chunk's
  block size (RF64: the size in the ``ds64`` chunk); the held count is what
  the bytes after the chunk's header make up. None for headers this does not
  understand or a streaming writer's "unknown" size.
  """
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (
        b"RIFF", b"RIFX", b"RF64"):
      return None
    endian = ">" if head[:4] == b"RIFX" else "<"
    block_align, rate, ds64_size = None, 0, None
    while True:
      chunk = f.read(8)
      if len(chunk) < 8:
        return None
      kind, size = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
      if kind == b"data":
        if ds64_size is not None and size == 0xFFFFFFFF:
          size = ds64_size
        if not block_align or size == 0xFFFFFFFF:
          return None
        held = os.fstat(f.fileno()).st_size - f.tell()
        return size // block_align, min(size, held) // block_align, rate
      body = f.read(min(size, 64)) if kind in (b"fmt ", b"ds64") else b""
      if kind == b"fmt " and len(body) >= 14:
        rate = struct.unpack(endian + "I", body[4:8])[0]
        block_align = struct.unpack(endian + "H", body[12:14])[0]
      elif kind == b"ds64" and len(body) >= 16:
        ds64_size = struct.unpack(endian + "Q", body[8:16])[0]
      f.seek(size + (size & 1) - len(body), 1)   # chunks are word aligned


def _cut_short(path, declared: int, held: int, rate: int) -> AudioError:
  if rate:
    declared_s = f"{declared} samples ({declared / rate:.3g} s at {rate} Hz)"
    held_s = f"{held} ({held / rate:.3g} s)"
  else:
    declared_s, held_s = f"{declared} samples", f"{held}"
  return AudioError(f"WAV file {path} is cut short: its header declares "
                    f"{declared_s}, the file holds {held_s}; replace it with "
                    "a complete copy.")


def read_wav(path: str | pathlib.Path) -> tuple[np.ndarray, int]:
  """Mono float32 samples in [-1, 1] and the sample rate of a WAV file.

  A file holding fewer samples than its header declares (cut short, e.g. by
  an interrupted copy) raises :class:`AudioError` naming the file; scipy's
  warnings (which name no file) are turned into that error or re-issued
  with the file's name.
  """
  from scipy.io import wavfile
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"audio file {path} does not exist.")
  try:
    frames = _wav_frames(path)
  except OSError as e:
    raise AudioError(f"cannot read WAV file {path}: {e}") from e
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      rate, data = wavfile.read(path)
  except Exception as e:  # scipy raises ValueError, EOFError, struct errors...
    if frames is not None and frames[1] < frames[0]:
      raise _cut_short(path, *frames) from None
    raise AudioError(f"cannot read WAV file {path}: {e}") from e
  if frames is not None and len(data) < frames[0]:   # the decoded duration
    raise _cut_short(path, frames[0], len(data), rate)
  for w in caught:
    if "EOF" in str(w.message):   # "Reached EOF prematurely" (scipy)
      raise AudioError(f"WAV file {path} is cut short: {w.message}")
  for w in caught:                # anything else: re-issued, with the file
    warnings.warn(f"WAV file {path}: {w.message}", w.category, stacklevel=2)
  if data.size == 0:
    raise AudioError(f"WAV file {path} holds no samples.")
  if np.issubdtype(data.dtype, np.integer):
    info = np.iinfo(data.dtype)
    if data.dtype == np.uint8:
      data = (data.astype(np.float32) - 128.0) / 128.0
    else:
      data = data.astype(np.float32) / float(-info.min)
  data = np.asarray(data, np.float32)
  if data.ndim == 2:
    data = data.mean(axis=1)
  return data, int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
  """Polyphase resampling from ``rate`` to ``target`` Hz."""
  if rate == target:
    return x
  from scipy.signal import resample_poly
  g = math.gcd(rate, target)
  return resample_poly(x, target // g, rate // g).astype(np.float32)


def fill_window(x: np.ndarray, length: int) -> np.ndarray:
  """Repeats (or cuts) ``x`` to exactly ``length`` samples, clipped to [-1, 1]."""
  reps = -(-length // len(x))
  return np.clip(np.tile(x, reps)[:length], -1.0, 1.0)


def log_spectrogram(x: np.ndarray, n_fft: int = 512, hop: int = 353
                    ) -> np.ndarray:
  """``log(|STFT(x)| + 1e-7)`` as ``[n_fft // 2 + 1, frames]`` float32."""
  pad = n_fft // 2
  x = np.pad(np.asarray(x, np.float32), pad, mode="constant")
  frames = 1 + (len(x) - n_fft) // hop
  idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
  spec = np.fft.rfft(x[idx] * window, axis=1).T
  return np.log(np.abs(spec) + 1e-7).astype(np.float32)


def wav_to_spectrogram(path, *, sample_rate: int = 22050, seconds: float = 3.0,
                       n_fft: int = 512, hop: int = 353,
                       frames: int | None = None) -> np.ndarray:
  """WAV file -> ``[n_fft // 2 + 1, frames]`` log-magnitude spectrogram.

  :func:`samples_to_spectrogram` of the file's samples (a damaged file
  raises :class:`AudioError` naming it).
  """
  x, rate = read_wav(path)
  return samples_to_spectrogram(x, rate, sample_rate=sample_rate,
                                seconds=seconds, n_fft=n_fft, hop=hop,
                                frames=frames)


def samples_to_spectrogram(samples: np.ndarray, rate: int, *,
                           sample_rate: int = 22050, seconds: float = 3.0,
                           n_fft: int = 512, hop: int = 353,
                           frames: int | None = None) -> np.ndarray:
  """Mono samples at ``rate`` Hz -> ``[n_fft // 2 + 1, frames]`` spectrogram.

  The front end of :func:`wav_to_spectrogram` on an array (noise added, a
  synthesised source, another decoder): resampled to ``sample_rate``,
  repeated or cut to ``seconds`` and clipped to [-1, 1]
  (:func:`fill_window`), then ``log(|STFT| + 1e-7)``
  (:func:`log_spectrogram`). ``frames`` (optional) crops the time axis to
  that length, or pads it with the log of silence.
  """
  x = np.asarray(samples, np.float32)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"expected mono samples (a non-empty 1-D array); got "
                     f"shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("the samples hold NaN or Inf.")
  if int(rate) < 1:
    raise ValueError(f"rate must be a positive sample rate in Hz; got {rate}.")
  x = fill_window(resample(x, int(rate), sample_rate),
                  int(sample_rate * seconds))
  spec = log_spectrogram(x, n_fft, hop)
  if frames is not None and spec.shape[1] != frames:
    if spec.shape[1] > frames:
      spec = spec[:, :frames]
    else:
      spec = np.pad(spec, ((0, 0), (0, frames - spec.shape[1])),
                    constant_values=np.log(1e-7))
  return spec
