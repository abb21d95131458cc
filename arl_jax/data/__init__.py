"""Data sources returning ``{modality: array}`` inputs and integer labels.

* :func:`make_linear_gaussian` / :func:`make_nonlinear_gaussian`: synthetic
  K-modality problems with a known Bayes-optimal accuracy (linear-Gaussian,
  or seen through a non-linear bijection).
* :func:`make_imbalanced`: synthetic problems where modality imbalance
  happens (a memorisable code against a slower, stronger one), with exact
  Bayes accuracies.
* :func:`load_uci_multifeature`: the UCI Multiple Features digits, six views.
* :func:`prepare` / :func:`load_prepared` / :func:`av_batches`: TFDS builders
  for CREMA-D, Kinetics-Sounds and AVE from local files, and their grain
  pipeline (``tensorflow-datasets``, ``grain``: the ``data`` extra);
  :class:`FrameAugmentation`: their crop/flip/resize on the accelerator.
* :func:`prepare_fsdd` / :func:`load_fsdd`: the Free Spoken Digit Dataset
  (real speech, 3,000 recordings of 6 speakers) as a TFDS builder from a
  verified local copy, and all of it as spectrogram arrays;
  :func:`load_audio_visual_digits`: those recordings paired with the UCI
  handwritten digits, test and validation speakers never in training.
* :func:`group_holdout`: a held-out slice made of whole groups (speakers,
  subjects), so that it resembles unseen data.
* :func:`save_arrays` / :func:`load_arrays`: your own multimodal arrays
  (three splits, optional groups) as one checked ``.npz``, the runner's
  ``arrays`` source.

Modules: ``layouts`` (what a local copy holds), ``builders`` (the TFDS
builders, :func:`prepare`), ``prepared`` (the storage format and its reader,
:func:`load_prepared`), ``av_pipeline`` (batches), ``device_augment``,
``fsdd`` (the Free Spoken Digit Dataset), ``av_digits`` (its pairing with
handwriting), ``batching`` (in-memory batches,
the padded last batch), ``splits`` (stratified splits), ``synthetic``,
``uci_multifeature``, ``audio``.
"""

from arl_jax.data.arrays import load_arrays
from arl_jax.data.arrays import save_arrays
from arl_jax.data.av_digits import load_audio_visual_digits
from arl_jax.data.av_pipeline import batches as av_batches
from arl_jax.data.batching import iterate_batches
from arl_jax.data.builders import prepare
from arl_jax.data.device_augment import FrameAugmentation
from arl_jax.data.fsdd import load as load_fsdd
from arl_jax.data.fsdd import prepare as prepare_fsdd
from arl_jax.data.layouts import AV_DATA_SETS
from arl_jax.data.layouts import DataError
from arl_jax.data.prepared import frame_canvas
from arl_jax.data.prepared import load_prepared
from arl_jax.data.splits import group_holdout
from arl_jax.data.synthetic import IMBALANCE_SETTINGS
from arl_jax.data.synthetic import ModalitySpec
from arl_jax.data.synthetic import SyntheticProblem
from arl_jax.data.synthetic import make_imbalanced
from arl_jax.data.synthetic import make_linear_gaussian
from arl_jax.data.synthetic import make_nonlinear_gaussian
from arl_jax.data.uci_multifeature import MultiViewData
from arl_jax.data.uci_multifeature import load_uci_multifeature

__all__ = [
    "AV_DATA_SETS",
    "DataError",
    "IMBALANCE_SETTINGS",
    "ModalitySpec",
    "FrameAugmentation",
    "MultiViewData",
    "SyntheticProblem",
    "av_batches",
    "frame_canvas",
    "group_holdout",
    "iterate_batches",
    "load_arrays",
    "load_audio_visual_digits",
    "load_fsdd",
    "load_prepared",
    "load_uci_multifeature",
    "make_imbalanced",
    "make_linear_gaussian",
    "make_nonlinear_gaussian",
    "prepare",
    "prepare_fsdd",
    "save_arrays",
]
