"""Audio preprocessing: WAV reading, resampling and the log-magnitude STFT.

The spectrogram follows the reference preprocessing of CREMA-D: load at
22.05 kHz, repeat the clip to fill the window (3 s), clip to [-1, 1], STFT
with ``n_fft=512``, ``hop=353``, a periodic Hann window, centred frames with
zero padding (librosa's ``stft`` defaults), then ``log(|S| + 1e-7)``: a
257 x 188 array for 3 s.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np


class AudioError(ValueError):
  """A WAV file that cannot be read (names the file)."""


def read_wav(path: str | pathlib.Path) -> tuple[np.ndarray, int]:
  """Mono float32 samples in [-1, 1] and the sample rate of a WAV file."""
  from scipy.io import wavfile
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"audio file {path} does not exist.")
  try:
    rate, data = wavfile.read(path)
  except Exception as e:  # scipy raises ValueError, EOFError, struct errors...
    raise AudioError(f"cannot read WAV file {path}: {e}") from e
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

  ``frames`` (optional) crops the time axis to that length, or pads it with
  the log of silence.
  """
  x, rate = read_wav(path)
  x = fill_window(resample(x, rate, sample_rate), int(sample_rate * seconds))
  spec = log_spectrogram(x, n_fft, hop)
  if frames is not None and spec.shape[1] != frames:
    if spec.shape[1] > frames:
      spec = spec[:, :frames]
    else:
      spec = np.pad(spec, ((0, 0), (0, frames - spec.shape[1])),
                    constant_values=np.log(1e-7))
  return spec
