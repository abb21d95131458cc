"""The main job: balancing methods on problems where modality imbalance happens.

Suite ``imbalance`` (the default, ``make run``): the four settings of
``arl_jax.data.IMBALANCE_SETTINGS`` (two where plain concatenation starves the
stronger modality, a three-modality one, and a control without imbalance),
5 seeds. Rows: each modality trained alone, the late-fusion ensemble of
those, concat, unimodal regularisation (UR), ARL with each variance
estimator, and inverse-variance / calibrated weighting at the fusion
(fitted on held-out training rows). For every row: test accuracy at the
validation-selected epoch and at the last epoch, the paired difference to
concat and to UR over seeds (same initialisation and batch order), how many
selected epochs fall inside the warm-up, and linear probes of each frozen
encoder. The imbalance signature is checked per setting.

Suite ``balanced`` (``--suite balanced``): the earlier problems without
imbalance (two synthetic linear-Gaussian problems and UCI Multiple Features).

Writes ``results/compare.{md,json}`` (``compare_balanced.*``) and plots,
in the ignored ``results/`` folder (``--out`` elsewhere); the committed copy
in ``experiments/results/`` is refreshed on purpose, with ``--out
experiments/results`` (``make results``). Each run keeps its workdir under
``workdirs/compare/<suite>`` and is read back when finished.

  python -m experiments.compare            # or: make run   (~15 min, 2 cores)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import platform
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "results"                           # ignored by git
COMMITTED = ROOT / "experiments" / "results"     # --out for the committed copy

BALANCED_METHODS = ("concat", "unimodal_regularisation", "arl_no_residual",
                    "arl", "arl_released", "arl_released_applied", "ogm_ge",
                    "mmpareto", "agm", "dr", "pmr", "g_blending", "mla")
# Each method as its authors ran it, the same in both suites (docs/methods.md,
# "Differences from the official code"). The method defaults already hold
# the official schedules: OGM-GE modulates in epochs 0-50, AGM in 0-20 (its
# coefficient held afterwards), PMR in 0-100, none after the shared warm-up;
# D&R's 90-epoch re-initialisations (after epochs 20/40/60) scaled to the
# run; MLA's batch gate per 64 evaluation rows (its test loader). Besides:
# OGM-GE at the CREMA-D alpha 0.8 (argparse default 0.1); PMR at its concat
# script's alpha 2, prototype momentum 0, window 0-70 (argparse: 1, 0.2,
# 0-100); MMPareto from the first step (its official code has no warm-up);
# MLA with its model's single head shared by the modalities.
METHOD_OVERRIDES = {"ogm_ge": {"method.alpha": 0.8},
                    "mmpareto": {"warmup_epochs": 0},
                    "pmr": {"method.alpha": 2.0, "method.mu": 0.0,
                            "method.modulation_ends": 70},
                    "mla": {"model.fusion": "shared"}}

# Training runs of the imbalance suite: row name -> config overrides.
# (Variants of earlier tables, trained with --extended: VARIANT_RUNS.)
IMBALANCE_RUNS = {
    "concat": {"method.name": "concat"},
    "UR": {"method.name": "unimodal_regularisation"},
    "ARL (train entropy, paper)": {"method.name": "arl"},
    "ARL (held-out variance)": {"method.name": "arl",
                                "method.estimator": "heldout_variance"},
    "ARL (held-out error)": {"method.name": "arl",
                             "method.estimator": "heldout_error"},
    "OGM-GE": {"method.name": "ogm_ge", **METHOD_OVERRIDES["ogm_ge"]},
    "MMPareto": {"method.name": "mmpareto", **METHOD_OVERRIDES["mmpareto"]},
    "AGM": {"method.name": "agm"},
    "D&R": {"method.name": "dr"},
    "PMR": {"method.name": "pmr", **METHOD_OVERRIDES["pmr"]},
    "G-Blending": {"method.name": "g_blending"},
    "MLA": {"method.name": "mla", **METHOD_OVERRIDES["mla"]},
    # The same training, MLA's other two inference rules: the official code
    # without --dynamic (0.55 / 0.45 in sorted order: audio first) and
    # BalanceBenchmark's per-row entropy gate.
    "MLA (fixed weights 0.55/0.45)": {
        "method.name": "mla", "method.gating": "fixed",
        "method.fixed_weights": (0.55, 0.45), **METHOD_OVERRIDES["mla"]},
    "MLA (per-row gate)": {"method.name": "mla",
                           "method.gating": "sample_entropy",
                           **METHOD_OVERRIDES["mla"]},
}
VARIANT_RUNS = {
    "ARL (held-out entropy)": {"method.name": "arl",
                               "method.estimator": "heldout_entropy"},
    "ARL (held-out variance, EMA 0.9)": {
        "method.name": "arl", "method.estimator": "heldout_variance",
        "method.ema": 0.9},
    "MLA (head-gradient projection)": {"method.name": "mla",
                                       "method.projection": "replace",
                                       **METHOD_OVERRIDES["mla"]},
}
# The real audio-visual digits (experiments/configs/av_digits.py): every
# row of the synthetic problems, and UR with its held-out rows taken from
# the training speakers (random rows) instead of a speaker of its own.
REAL_PROBLEMS = {"av_digits": {}, "av_digits_lr1e-3": {
    "optim.learning_rate": 0.001}}
# With --extended: the full 129 x 63 spectrogram, where the late collapse of
# Eq. 22 as written is strongest (UR and its unnormalised form only).
EXTENDED_REAL_PROBLEMS = {
    "av_digits_full_spectrogram": {"data.audio_pool": (1, 1)},
    # Small CNN encoders on the spectrogram and the image.
    "av_digits_cnn": {"model.encoder": "cnn"},
}
COLLAPSE_ROWS = ("UR", "UR (loss weights not normalised)")

RANDOM_HELDOUT = {"data.heldout_by_group": False}
REAL_EXTRA_RUNS = {
    "UR (held-out rows from the training speakers)": {
        "method.name": "unimodal_regularisation", **RANDOM_HELDOUT},
    # Eq. 22 as written: the late collapse (collapse.png).
    "UR (loss weights not normalised)": {
        "method.name": "unimodal_regularisation",
        "optim.normalize_loss_weights": False},
}
# At the low learning rate: the rows the target compares.
LOW_LR_ROWS = ("concat", "UR", "ARL (held-out error)", "G-Blending")
# The training rows of each real problem besides the alone rows (None: all).
REAL_ROWS = {"av_digits": None, "av_digits_lr1e-3": LOW_LR_ROWS,
             "av_digits_full_spectrogram": ("concat",) + COLLAPSE_ROWS,
             "av_digits_cnn": LOW_LR_ROWS}
# Rows defined for two modalities only (no row with three modalities).
TWO_MODALITIES_ONLY = ("PMR", "pmr", "MLA (fixed weights 0.55/0.45)")
# Rows read from those runs' evaluation with weights at the fusion.
FUSION_ROWS = {
    "concat + calibrated fusion": ("concat", "calibrated"),
    "UR + inverse-variance fusion": ("UR", "inverse_variance"),
    "UR + inverse-error fusion": ("UR", "inverse_error"),
    "UR + calibrated fusion": ("UR", "calibrated"),
    "ARL (held-out variance) + calibrated fusion": ("ARL (held-out variance)",
                                                    "calibrated"),
    "G-Blending + calibrated fusion": ("G-Blending", "calibrated"),
    "UR (held-out rows from the training speakers) + inverse-variance fusion":
        ("UR (held-out rows from the training speakers)", "inverse_variance"),
    "UR (held-out rows from the training speakers) + calibrated fusion":
        ("UR (held-out rows from the training speakers)", "calibrated"),
}
# Late fusion of the modalities trained alone (from their best-validation
# predictions): mean of probabilities, product of experts (sum of
# log-probabilities, the Bayes rule for conditionally independent
# modalities) and its weighted form (weights fitted on validation rows).
LATE_FUSION_ROWS = ("late fusion: mean of probabilities",
                    "late fusion: product of experts",
                    "late fusion: product of experts, validation-weighted")
# The rows a method must beat ("best baseline": the best of these by mean).
BASELINE_ROWS = ("stronger modality alone", "G-Blending") + LATE_FUSION_ROWS


# A synthetic problem left out of `make run` (its findings repeat those of
# memorise_vs_parity; --extended trains it).
EXTENDED_PROBLEMS = ("memorise_vs_parity_wide",)


# A user's own problems (--arrays NAME=PATH): spawned workers read them from
# this variable, set before the pool starts.
USER_ARRAYS_ENV = "ARL_JAX_COMPARE_ARRAYS"


def user_problems() -> dict[str, str]:
  """``{name: arrays file}`` of the problems given with ``--arrays``."""
  spec = os.environ.get(USER_ARRAYS_ENV, "")
  return dict(item.split("=", 1) for item in spec.split("\n") if item)


def _user_config(path: str):
  """The imbalance suite's recipe on a user's arrays file; the held-out
  slice is made of whole groups when the file has them."""
  from experiments.configs import imbalance
  c = imbalance.get_config()
  c.data.source, c.data.path = "arrays", str(path)
  c.diagnostics.linear_probe = True
  with np.load(path, allow_pickle=False) as z:
    c.data.heldout_by_group = "train.groups" in z.files
  return c


def imbalance_settings(extended: bool = True):
  from arl_jax import data
  from experiments import configs
  from experiments.configs import av_digits
  from experiments.configs import imbalance
  out = {name: _user_config(path) for name, path in user_problems().items()}
  for name in data.IMBALANCE_SETTINGS:
    if name in EXTENDED_PROBLEMS and not extended:
      continue
    c = imbalance.get_config()
    c.data.setting = name
    out[name] = c
  real = {**REAL_PROBLEMS, **(EXTENDED_REAL_PROBLEMS if extended else {})}
  for name, overrides in real.items():
    out[name] = configs.override(av_digits.get_config(), overrides)
  return out


def modalities(problem: str) -> tuple[str, ...]:
  from arl_jax import data
  if problem in user_problems():
    return tuple(data.arrays.file_modalities(user_problems()[problem]))
  if problem in REAL_PROBLEMS or problem in EXTENDED_REAL_PROBLEMS:
    return ("audio", "image")
  return tuple(sorted(data.IMBALANCE_SETTINGS[problem]))


def balanced_settings():
  from experiments.configs import synthetic
  from experiments.configs import uci

  def syn(nonlinear):
    c = synthetic.get_config()
    c.data.noise = {"audio": 1.0, "visual": 2.5}
    c.data.nonlinear = nonlinear
    c.data.sizes = (2048, 512, 4096)
    c.num_epochs, c.warmup_epochs, c.optim.decay_epochs = 16, 2, (12,)
    return c

  def uci_views(views):
    c = uci.get_config()
    c.data.views = views
    c.num_epochs, c.warmup_epochs, c.optim.decay_epochs = 24, 2, (18,)
    return c

  return {
      "synthetic_linear": syn(False),
      "synthetic_nonlinear": syn(True),
      "uci_profile+morphological": uci_views(("profile", "morphological")),
      "uci_fourier+karhunen+morphological": uci_views(
          ("fourier", "karhunen", "morphological")),
  }


def runs(suite: str, variants: bool = False) -> dict[str, dict[str, dict]]:
  """``{problem: {row: overrides}}`` of the training runs of a suite."""
  if suite == "balanced":
    out = {}
    for problem, config in balanced_settings().items():
      k = len(config.data.views) if config.data.source == "uci" else len(
          config.data.noise)
      out[problem] = {m: {"method.name": m, **METHOD_OVERRIDES.get(m, {})}
                      for m in BALANCED_METHODS
                      if k == 2 or m not in TWO_MODALITIES_ONLY}
    return out
  out = {}
  for problem in imbalance_settings(extended=variants):
    mods = modalities(problem)
    rows = {f"{m} alone": {"method.name": "concat", "data.only_modality": m}
            for m in mods}
    train = {**IMBALANCE_RUNS, **(VARIANT_RUNS if variants else {})}
    if problem in REAL_ROWS:
      train.update(REAL_EXTRA_RUNS)
      if REAL_ROWS[problem] is not None:
        train = {r: o for r, o in train.items() if r in REAL_ROWS[problem]}
    out[problem] = {**rows, **{
        name: o for name, o in train.items()
        if len(mods) == 2 or name not in TWO_MODALITIES_ONLY}}
  return out


def _prepare_real_data(workroot: pathlib.Path) -> None:
  """Prepares FSDD once, before the worker processes read it."""
  from arl_jax.data import fsdd
  fsdd.prepare(workroot / "data")


def _config(suite: str, problem: str, overrides: dict, seed: int,
            workroot: pathlib.Path):
  base = (balanced_settings() if suite == "balanced"
          else imbalance_settings())[problem]
  from experiments import configs
  c = configs.override(base.copy_and_resolve_references(), overrides)
  c.seed = seed
  c.plots = False          # the comparison draws its own figures
  c.tensorboard = False    # and writes its own tables (metrics.jsonl stays)
  c.progress = "none"
  c.checkpoint_every_epochs = c.num_epochs
  if c.data.source == "av_digits":
    c.data.prepared_dir = str(pathlib.Path(workroot) / "data")
  return c


def _slug(row: str) -> str:
  keep = "".join(ch if ch.isalnum() else "_" for ch in row.lower())
  return "_".join(filter(None, keep.split("_")))


def _run_one(task):
  """Every seed of one row as one training program (in a worker process);
  returns ((problem, row), {seed: report}, took)."""
  suite, problem, row, overrides, seeds, workroot = task
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    str(pathlib.Path(workroot) / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from experiments import train
  workdir = pathlib.Path(workroot) / problem / _slug(row)
  done = [workdir / f"seed{s}" / "results.json" for s in seeds]
  start = time.perf_counter()
  if all(p.exists() for p in done):   # finished: read back, not retrained
    return ((problem, row), {s: json.loads(p.read_text())
                             for s, p in zip(seeds, done)}, None)
  c = _config(suite, problem, overrides, seeds[0], workroot)
  if c.model.encoder == "cnn":
    # Convolutions: one program per seed, the same layout (vmap makes them
    # grouped convolutions and lax.map loses XLA's fast CPU convolution:
    # both several times slower, benchmarks/results/seeds_cpu.md).
    reports = []
    for s in seeds:
      c.seed = s
      reports.append(train.train_and_evaluate(c, workdir / f"seed{s}"))
  else:
    c.num_seeds = len(seeds)
    report = train.train_and_evaluate(c, workdir)
    reports = report["seeds"] if len(seeds) > 1 else [report]
  return ((problem, row), dict(zip(seeds, reports)),
          time.perf_counter() - start)


def run_all(suite: str, seeds, workroot: pathlib.Path, only=None,
            workers: int = 1, variants: bool = False):
  """Every row of the suite, all seeds of a row in one program (the step
  vmapped over the seeds: ``config.num_seeds``; rows with convolutional
  encoders seed by seed)."""
  seeds = list(seeds)
  if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
    raise ValueError(f"the seeds of a row are consecutive; got {seeds}.")
  tasks = [(suite, problem, row, overrides, seeds, str(workroot))
           for problem, rows in runs(suite, variants).items()
           if not only or problem in only
           for row, overrides in rows.items()]
  results, reused = {}, 0
  # The longest rows first (G-Blending trains K + 1 model copies besides
  # its run), so that no worker is left with one at the end.
  order = sorted(tasks, key=lambda t: t[3].get("method.name") != "g_blending")
  # Small models: one XLA thread per worker process, one process per core.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    for (problem, row), reports, took in pool.map(_run_one, order):
      results.setdefault(problem, {})[row] = reports
      reused += len(seeds) if took is None else 0
      accs = " ".join(f"{reports[s]['test_accuracy_at_best_val']:.4f}"
                      for s in seeds)
      print(f"{problem:34s} {row:44s} seeds {seeds[0]}-{seeds[-1]}: test acc "
            f"{accs} ({'read back' if took is None else f'{took:.1f} s'})",
            flush=True)
  done = results
  results = {}
  for _, problem, row, *_ in tasks:        # the suite's order
    by_seed = done[problem][row]
    results.setdefault(problem, {})[row] = [by_seed[s] for s in
                                            sorted(by_seed)]
  return results, reused, len(tasks) * len(seeds)


# ------------------------------------------------------ imbalance tables --

def _fit_log_prob_weights(log_probs: list[np.ndarray], labels: np.ndarray,
                          steps: int = 500, lr: float = 0.05) -> np.ndarray:
  """Weights ``w >= 0`` maximising the likelihood of ``softmax(sum_m w_m
  log p_m)`` on the given rows: :func:`arl_jax.fusion_weighting.
  fit_fusion_weights` with the log-probabilities as the terms and their sum
  as the fused logits (so its bias term is zero)."""
  from arl_jax import fusion_weighting
  terms = {f"m{k:03d}": np.asarray(v, np.float32)   # sorted = list order
           for k, v in enumerate(log_probs)}
  fused = sum(terms[m] for m in sorted(terms))
  w = fusion_weighting.fit_fusion_weights(fused, terms, np.asarray(labels),
                                          steps=steps, learning_rate=lr)
  return np.array([float(w[m]) for m in sorted(terms)])


def _late_fusion(workroot: pathlib.Path, problem: str, rows, seeds
                 ) -> dict[str, list[float]]:
  """Test accuracy of the late-fusion rows (``LATE_FUSION_ROWS``) per seed,
  from the alone models' best-validation predictions; the weighted product
  of experts fits its weights on the validation rows (never on test)."""
  out = {name: [] for name in LATE_FUSION_ROWS}
  for seed in seeds:
    z = [np.load(workroot / problem / _slug(row) / f"seed{seed}" /
                 "predictions.npz") for row in rows]
    test = [np.asarray(p["test_log_probs"], np.float64) for p in z]
    labels = z[0]["test_labels"]
    w = _fit_log_prob_weights([p["validation_log_probs"] for p in z],
                              z[0]["validation_labels"])
    acc = lambda scores, y=labels: float(np.mean(np.argmax(scores, -1) == y))
    out[LATE_FUSION_ROWS[0]].append(acc(np.mean(np.exp(test), 0)))
    out[LATE_FUSION_ROWS[1]].append(acc(np.sum(test, 0)))
    out[LATE_FUSION_ROWS[2]].append(acc(np.einsum("k,kbc->bc", w, test)))
  return out


def _row_values(reports, fusion=None):
  """(test acc at best val, test acc last, best epochs, warm-up epochs)."""
  if fusion is None:
    return ([r["test_accuracy_at_best_val"] for r in reports],
            [r.get("test_accuracy_last", np.nan) for r in reports],
            [r.get("best_epoch") for r in reports],
            [r.get("warmup_epochs") for r in reports])
  f = [r["fusion"][fusion] for r in reports]
  return ([x["test_accuracy_at_best_val"] for x in f],
          [x["test_accuracy_last"] for x in f],
          [x["best_epoch"] for x in f], [r["warmup_epochs"] for r in reports])


def _pm(values, signed=False):
  """``mean ± sample std`` (ddof 1) in points."""
  v = 100 * np.asarray(values, np.float64)
  if np.all(np.isnan(v)):
    return "–"
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():{'+' if signed else ''}.2f} ± {std:.2f}"


def imbalance_rows(results, workroot, seeds):
  """``{problem: {row: values}}`` including ensembles and fusion rows."""
  table = {}
  for problem, by_row in results.items():
    alone = [r for r in by_row if r.endswith(" alone")]
    rows = {r: _row_values(by_row[r]) for r in by_row}
    best_alone = max(alone, key=lambda r: np.mean(rows[r][0]))
    rows["stronger modality alone"] = rows[best_alone]
    for name, acc in _late_fusion(workroot, problem, alone, seeds).items():
      rows[name] = (acc, [np.nan] * len(acc), [None] * len(acc),
                    [None] * len(acc))
    for name, (run, fusion) in FUSION_ROWS.items():
      # (Runs finished before a weighting existed have no record of it.)
      if run in by_row and all(fusion in r.get("fusion", {})
                               for r in by_row[run]):
        rows[name] = _row_values(by_row[run], fusion)
    table[problem] = rows
  return table


def signature(results) -> dict[str, dict]:
  """The imbalance signature per problem, over seeds (paired)."""
  out = {}
  for problem, by_row in results.items():
    alone = {r.split()[0]: by_row[r] for r in by_row if r.endswith(" alone")}
    best = {m: np.mean([r["test_accuracy_at_best_val"] for r in rs])
            for m, rs in alone.items()}
    strong = max(best, key=best.get)
    concat = by_row["concat"]
    gap = np.subtract([r["test_accuracy_at_best_val"] for r in concat],
                      [r["test_accuracy_at_best_val"] for r in alone[strong]])
    # The stronger modality's encoder, starved inside concat: its probe.
    probe = np.subtract(
        [r["probe_accuracy_at_best_val"][strong]["test"] for r in concat],
        [r["probe_accuracy_at_best_val"][strong]["test"]
         for r in alone[strong]])
    out[problem] = {
        "strong": strong, "concat_minus_strong_alone": gap,
        "probe_inside_minus_alone": probe,
        "holds": bool(np.all(gap < 0) and np.all(probe < 0))}
  return out


def imbalance_markdown(results, rows, sig) -> str:
  lines = []
  for problem, by_row in rows.items():
    first = next(iter(results[problem].values()))[0]
    s = sig[problem]
    if "bayes_accuracy" in first:
      uni = first["unimodal_bayes_accuracy"]
      about = (f"Bayes-optimal test accuracy {100 * first['bayes_accuracy']:.2f}%"
               " (unimodal: " + ", ".join(f"{m} {100 * v:.2f}%"
                                          for m, v in uni.items()) + ").")
    else:
      sp = first.get("speakers", {})
      about = ("Real recordings: test speaker(s) " + ", ".join(
          sp.get("test", [])) + "; validation " + ", ".join(
          sp.get("validation", [])) + "; held-out rows from " + ", ".join(
          first.get("heldout_speakers", ["random training rows"])) + " (no "
          "row of theirs trains); training " + ", ".join(
          x for x in sp.get("train", [])
          if x not in first.get("heldout_speakers", [])) + ".")
    base_best = max((r for r in BASELINE_ROWS if r in by_row),
                    key=lambda r: np.mean(by_row[r][0]))
    lines += [f"### {problem}", "", about,
              f"Best baseline (by mean): **{base_best}**.",
              f"Imbalance signature **{'holds' if s['holds'] else 'absent'}**: "
              f"concat − {s['strong']} alone = "
              f"{_pm(s['concat_minus_strong_alone'], True)} pts; linear probe "
              f"of {s['strong']}'s encoder inside concat − alone = "
              f"{_pm(s['probe_inside_minus_alone'], True)} pts (test, paired "
              "over seeds; 'holds' = both negative for every seed).", "",
              "| row | test acc % (best val) | Δ vs concat | Δ vs UR | "
              "Δ vs best baseline | test acc % (last) | Δ last vs concat | "
              "Δ last vs UR | selected in warm-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    base, base_last = by_row["concat"][0], by_row["concat"][1]
    ur, ur_last = by_row["UR"][0], by_row["UR"][1]
    top = by_row[base_best][0]
    for name, (best, last, epochs, warm) in by_row.items():
      in_warm = [e is not None and w is not None and e <= w
                 for e, w in zip(epochs, warm)]
      warm_txt = (f"{sum(in_warm)}/{len(in_warm)}"
                  if epochs[0] is not None else "–")
      lines.append(
          f"| {name} | {_pm(best)} | {_pm(np.subtract(best, base), True)} | "
          f"{_pm(np.subtract(best, ur), True)} | "
          f"{_pm(np.subtract(best, top), True)} | {_pm(last)} | "
          f"{_pm(np.subtract(last, base_last), True)} | "
          f"{_pm(np.subtract(last, ur_last), True)} | {warm_txt} |")
    lines.append("")
    arl_rows = [r for r in results[problem] if r.startswith("ARL")]
    mods = modalities(problem)
    lines += ["ARL's coefficients at the last epoch (train-epoch mean; the "
              "encoder with the larger a_m is pushed harder), and the fitted "
              "fusion weights at the selected epoch:", "",
              "| run | " + " | ".join(f"a[{m}]" for m in mods) + " |",
              "|---|" + "---|" * len(mods)]
    for r in arl_rows:
      reps = results[problem][r]
      lines.append(f"| {r} | " + " | ".join(
          f"{np.mean([x['a_last'][m] for x in reps]):.3f}" for m in mods)
          + " |")
    for name, (run, fusion) in FUSION_ROWS.items():
      reps = results[problem].get(run)
      if reps and all(fusion in x.get("fusion", {}) for x in reps):
        w = [x["fusion"][fusion]["weights_at_best_val"] for x in reps]
        lines.append(f"| {name}: weights | " + " | ".join(
            f"w {np.mean([x[m] for x in w]):.2f}" for m in mods) + " |")
    lines.append("")
    probes = [r for r in results[problem] if "probe_accuracy_at_best_val"
              in results[problem][r][0]]
    lines += ["Linear probes of the frozen encoders (test accuracy %, best "
              "validation epoch):", "",
              "| run | " + " | ".join(mods) + " |",
              "|---|" + "---|" * len(mods)]
    for r in probes:
      reps = results[problem][r]
      lines.append(f"| {r} | " + " | ".join(
          _pm([x["probe_accuracy_at_best_val"][m]["test"] for x in reps])
          for m in mods) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_imbalance(rows, results, workroot, out: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from experiments import plots
  names = list(rows)
  fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.6))
  for ax, problem in zip(np.atleast_1d(axes), names):
    by = rows[problem]
    acc = [100 * np.asarray(v[0]) for v in by.values()]
    colors = ["C2" if "alone" in r or "ensemble" in r else
              "C1" if "fusion" in r else "C0" for r in by]
    colors = ["C2" if "alone" in r or "late fusion" in r else c
              for r, c in zip(by, colors)]
    ax.barh(range(len(by)), [a.mean() for a in acc],
            xerr=[a.std(ddof=1) for a in acc], color=colors, alpha=0.85)
    bayes = next(iter(results[problem].values()))[0].get("bayes_accuracy")
    if bayes is not None:
      ax.axvline(100 * bayes, color="k", ls="--", lw=1, label="Bayes")
    ax.axvline(np.mean(by["UR"][0]) * 100, color="C3", lw=0.8, label="UR")
    lo = min(a.mean() for a in acc)
    hi = 100 * bayes if bayes is not None else max(a.mean() for a in acc)
    ax.set_xlim(max(0, lo - 3), min(100, hi + 2))
    ax.set_yticks(range(len(by)))
    ax.set_yticklabels(list(by), fontsize=7)
    ax.invert_yaxis()
    ax.set_title(problem, fontsize=9)
    ax.set_xlabel("test accuracy % (best validation epoch)")
    ax.legend(fontsize=7)
  plots._save(fig, out / "compare_accuracy.png")
  plot_estimators(results, workroot, out)


def plot_collapse(results, workroot: pathlib.Path, out: pathlib.Path):
  """Training loss and test accuracy per epoch of UR with and without the
  normalised loss weights, every seed, on the real problems."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from experiments import plots
  names = [p for p in results if all(r in results[p] for r in COLLAPSE_ROWS)]
  if not names:
    return
  fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 6.4),
                           squeeze=False)
  for col, problem in enumerate(names):
    for i, row in enumerate(COLLAPSE_ROWS):
      for seed_dir in sorted((workroot / problem / _slug(row)).glob("seed*")):
        hist = [json.loads(l) for l in
                (seed_dir / "metrics.jsonl").read_text().splitlines()]
        ep = [h["epoch"] for h in hist]
        label = row if seed_dir.name == "seed0" else None
        axes[0, col].plot(ep, [h["train_loss"] for h in hist], color=f"C{i}",
                          lw=1, label=label)
        axes[1, col].plot(ep, [100 * h["test_accuracy"] for h in hist],
                          color=f"C{i}", lw=1, label=label)
    warm = next(iter(results[problem].values()))[0]["warmup_epochs"]
    for ax in axes[:, col]:
      ax.axvline(warm + 0.5, color="grey", ls=":", lw=1)
    axes[0, col].set_yscale("log")
    axes[0, col].set_ylabel("training loss (epoch mean)")
    axes[0, col].set_title(f"{problem}: UR, every seed (end of warm-up "
                           "dotted)", fontsize=8)
    axes[0, col].legend(fontsize=6)
    axes[1, col].set_ylabel("test accuracy % (diagnostic)")
    axes[1, col].set_xlabel("epoch")
  plots._save(fig, out / "collapse.png")


def plot_estimators(results, workroot: pathlib.Path, out: pathlib.Path):
  """Each estimator's q ratio over training against the quantity it targets
  (top), and the coefficient a of the first modality it produces (bottom)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from experiments import plots
  estimator_rows = [r for r in {**IMBALANCE_RUNS, **VARIANT_RUNS}
                    if r.startswith("ARL")]
  names = list(results)
  fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 7.0),
                           squeeze=False)
  for col, problem in enumerate(names):
    ax, ax_a = axes[0, col], axes[1, col]
    mods = modalities(problem)
    m, ref = mods[0], mods[-1]
    for i, row in enumerate(estimator_rows):
      path = workroot / problem / _slug(row) / "seed0" / "metrics.jsonl"
      if not path.exists():
        continue
      hist = [json.loads(l) for l in path.read_text().splitlines()]
      ep = [h["epoch"] for h in hist]
      label = row.removeprefix("ARL ").strip("()")
      ax.plot(ep, [h["q"][m] / h["q"][ref] for h in hist], color=f"C{i}",
              label=label)
      if "test_true_class_variance" in hist[0]:
        v = [h["test_true_class_variance"] for h in hist]
        ax.plot(ep, [x[ref] / x[m] for x in v], color=f"C{i}", ls=":",
                lw=1)
      ax_a.plot(ep, [h["a"][m] for h in hist], color=f"C{i}", label=label)
    bayes = next(iter(results[problem].values()))[0].get(
        "bayes_true_class_variance")
    if bayes:
      ax.axhline(bayes[ref] / bayes[m], color="k", ls="--", lw=1,
                 label="Bayes posteriors")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_yscale("log")
    ax.set_ylabel(f"q[{m}] / q[{ref}]")
    ax.set_title(f"{problem} (seed 0)", fontsize=9)
    ax.legend(fontsize=6)
    ax_a.axhline(1.0 / len(mods), color="grey", lw=0.5)
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel(f"a[{m}] (epoch mean)")
    ax_a.set_ylim(0, 1)
  fig.suptitle("top: estimated inverse-variance ratio (solid) vs the same "
               "model's true-class-probability variance ratio on the test "
               "split (dotted, diagnostic only); bottom: ARL's coefficient",
               fontsize=8)
  plots._save(fig, out / "estimators.png")


# ------------------------------------------------------- balanced tables --

def balanced_markdown(results) -> str:
  lines = []
  for name, by_method in results.items():
    first = next(iter(by_method.values()))[0]
    bayes = first.get("bayes_accuracy")
    lines += [f"### {name}", ""]
    if bayes is not None:
      uni = first["unimodal_bayes_accuracy"]
      lines += [f"Bayes-optimal test accuracy {100 * bayes:.2f}% (unimodal: "
                + ", ".join(f"{m} {100 * v:.2f}%" for m, v in uni.items())
                + ").", ""]
    lines += ["| method | test acc % (best val) | macro-F1 % | test acc % "
              "(last) | Δ vs concat | dependency ratio (final) | "
              "inverse-variance ratio (final) |",
              "|---|---|---|---|---|---|---|"]
    base = [r["test_accuracy_at_best_val"] for r in by_method["concat"]]
    for method, reports in by_method.items():
      acc = [r["test_accuracy_at_best_val"] for r in reports]
      dep = reports[0]["dependency_ratio_last"]
      ratio = lambda key, m, reports=reports: np.mean([r[key][m]
                                                       for r in reports])
      lines.append(
          f"| {method} | {_pm(acc)} | "
          f"{_pm([r['test_macro_f1_at_best_val'] for r in reports])} | "
          f"{_pm([r['test_accuracy_last'] for r in reports])} | "
          f"{_pm(np.subtract(acc, base), True)} | "
          + ", ".join(f"{m}: {ratio('dependency_ratio_last', m):.2f}"
                      for m in dep) + " | "
          + ", ".join(f"{m}: {ratio('inverse_variance_ratio_last', m):.2f}"
                      for m in dep) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", choices=("imbalance", "balanced"),
                      default="imbalance")
  parser.add_argument("--seeds", type=int, default=None,
                      help="default: 5 (imbalance), 3 (balanced)")
  parser.add_argument("--workroot", default=None)
  parser.add_argument("--out", default=str(OUT))
  parser.add_argument("--only", nargs="*", default=None)
  parser.add_argument("--extended", action="store_true",
                      help="also memorise_vs_parity_wide and the ARL and MLA "
                           "variants of earlier tables (held-out entropy, "
                           "EMA, head-gradient projection)")
  parser.add_argument("--workers", type=int,
                      default=min(2, os.cpu_count() or 1))
  parser.add_argument("--arrays", action="append", default=[],
                      metavar="NAME=PATH",
                      help="add your own problem: an arrays file written by "
                           "arl_jax.data.save_arrays, trained with every row "
                           "of the imbalance suite (repeatable)")
  args = parser.parse_args(argv)
  user = {}
  for item in args.arrays:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      parser.error(f"--arrays takes NAME=PATH; got {item!r}.")
    if name in imbalance_settings(extended=True) or name in user:
      parser.error(f"--arrays: the problem name {name!r} is taken.")
    from arl_jax.data import arrays as arrays_lib
    try:
      arrays_lib.load_arrays(path)
    except (OSError, ValueError) as e:
      parser.error(f"--arrays {name}: {e}")
    user[name] = str(pathlib.Path(path).resolve())
  if user:
    if args.suite != "imbalance":
      parser.error("--arrays adds problems to the imbalance suite.")
    os.environ[USER_ARRAYS_ENV] = "\n".join(f"{k}={v}"
                                            for k, v in user.items())
  seeds = range(args.seeds or (5 if args.suite == "imbalance" else 3))
  workroot = pathlib.Path(args.workroot or ROOT / "workdirs" / "compare" /
                          args.suite)
  import jax
  start = time.perf_counter()
  if args.suite == "imbalance":
    _prepare_real_data(workroot)
  results, reused, total = run_all(args.suite, seeds, workroot, args.only,
                                   args.workers, args.extended)
  shown = (os.path.relpath(workroot) if workroot.is_absolute()
           else str(workroot))
  reuse_note = (f" ({reused} of {total} runs read back from finished runs in "
                f"{shown}; delete it to train them again)" if reused else "")
  # A row's seeds share one program: each seed's log holds the row's time.
  run_s = sum(json.loads(l).get("time_s", 0.0) / json.loads(l).get(
      "num_seeds", 1)
              for path in workroot.glob("*/*/seed*/timings.jsonl")
              for l in path.read_text().splitlines() if l.strip())
  reuse_note += (f"; the runs' own epochs took {run_s / 60:.1f} min in total "
                 f"({run_s / 60 / args.workers:.1f} min per worker)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  flags = (" --extended" if args.extended else "") + (
      f" --only {' '.join(args.only)}" if args.only else "")
  header = (f"- command: `python -m experiments.compare --suite {args.suite} "
            f"--seeds {len(seeds)}{flags}`"
            + (" (README command 1: `make run`)"
               if args.suite == "imbalance" and not flags else "") + "\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, jax {jax.__version__}, backend "
            f"{jax.default_backend()}, {args.workers} worker processes; "
            f"{(time.perf_counter() - start) / 60:.1f} min in all"
            f"{reuse_note}\n")
  if args.suite == "imbalance":
    rows = imbalance_rows(results, workroot, seeds)
    sig = signature(results)
    md = ("# Balancing methods where modality imbalance happens\n\n" + header +
          f"- {len(seeds)} seeds per row (mean ± sample std, ddof 1); Δ "
          "columns are paired "
          "differences over seeds (same initialisation and batch order), in "
          "points; model selection on the validation split only, 'last' is "
          "the final epoch; 'selected in warm-up' counts seeds whose "
          "selected epoch lies in the warm-up, where ARL and UR are the same "
          "computation. Synthetic problems: 10% of the training rows are held "
          "out from gradients for every row; av_digits: one whole training "
          "speaker (about a quarter of the rows), unless the row says "
          "otherwise; the held-out estimators and the fusion weights read "
          "them (never the test split). 'Best baseline': the best by mean of "
          "the stronger modality alone, G-Blending and the late fusions of "
          "the alone models.\n\n"
          + imbalance_markdown(results, rows, sig))
    stem = "compare"
    plot_imbalance(rows, results, workroot, out)
    plot_collapse(results, workroot, out)
    payload = {"runs": results, "signature": {
        p: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in s.items()} for p, s in sig.items()}}
  else:
    md = ("# Offline comparison on problems without imbalance\n\n" + header +
          f"- {len(seeds)} seeds per cell (mean ± sample std, ddof 1); model "
          "selection on the validation split only; 'last' is the final "
          "epoch.\n\n"
          + balanced_markdown(results))
    stem = "compare_balanced"
    payload = results
  (out / f"{stem}.md").write_text(md)
  (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
  print(md)


if __name__ == "__main__":
  main()
