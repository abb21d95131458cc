"""Evaluation of a trained state: exact metrics of a split, the per-epoch
record, and fusion weights fitted on held-out rows."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

import arl_jax
from arl_jax import fusion_weighting


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int
             ) -> float:
  f1 = []
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    if tp + fp + fn == 0:
      continue
    f1.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1)) if f1 else 0.0


def evaluate(eval_step, state, batches, num_classes, *, logits: bool = False
             ) -> dict:
  """Exact metrics of a split (every row once); ``log_probs`` per row, and
  with ``logits`` the fused and unimodal logits too.

  ``eval_step(state, batch) -> host dict`` (the data-parallel step of
  :mod:`experiments.distributed`: sums over the global batch, per-row
  outputs of every row in order).
  """
  correct = count = 0.0
  uni: dict[str, float] = {}
  preds, labels, log_probs, fused, unimodal = [], [], [], [], []
  for batch in batches():
    out = eval_step(state, batch)
    correct += float(out["correct"])
    count += float(out["count"])
    for m, v in out["unimodal_correct"].items():
      uni[m] = uni.get(m, 0.0) + float(v)
    valid = np.asarray(out["valid"])
    preds.append(np.asarray(out["predictions"])[valid])
    labels.append(np.asarray(out["labels"])[valid])
    f = np.asarray(out["fused_logits"])[valid]
    log_probs.append(f - np.logaddexp.reduce(f, axis=-1, keepdims=True))
    if logits:
      fused.append(f)
      unimodal.append({m: np.asarray(v)[valid]
                       for m, v in out["unimodal_logits"].items()})
  p, y = np.concatenate(preds), np.concatenate(labels)
  result = {"accuracy": correct / max(count, 1.0),
            "macro_f1": macro_f1(p, y, num_classes), "count": int(count),
            "unimodal_accuracy": {m: v / max(count, 1.0)
                                  for m, v in uni.items()},
            "log_probs": np.concatenate(log_probs), "labels": y}
  if logits:
    result["fused_logits"] = np.concatenate(fused)
    result["unimodal_logits"] = {m: np.concatenate([u[m] for u in unimodal])
                                 for m in unimodal[0]}
  return result


def encoder_distance(initial, final, modalities) -> dict[str, float]:
  """``||theta_m(final) - theta_m(initial)||`` per encoder (how far it moved)."""
  labels = arl_jax.label_modalities(modalities)(initial)
  sq = dict.fromkeys(modalities, 0.0)
  for a, b, m in zip(jax.tree.leaves(initial), jax.tree.leaves(final),
                     jax.tree.leaves(labels)):
    if m in sq:
      sq[m] += float(np.sum((np.asarray(b, np.float64) - a) ** 2))
  return {m: float(np.sqrt(v)) for m, v in sq.items()}


def _ratio(a: float, b: float) -> float:
  return a / b if b else math.nan


def epoch_record(epoch, train, val, test, lr, modalities) -> dict:
  ref = modalities[-1]
  q, s = train["q"], train["s"]
  return {
      "epoch": epoch, "lr": float(lr),
      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
      "train_unimodal_accuracy": train["unimodal_accuracy"],
      "q": q, "s": s, "a": train["a"], "scale": train["scale"],
      "warmup": train["warmup"], "update_skipped": train["update_skipped"],
      # Fig. 3 of the paper: the dependency ratio s_m / s_ref against the
      # inverse-variance ratio q_m / q_ref (ref: the last modality).
      "dependency_ratio": {m: _ratio(s[m], s[ref]) for m in modalities
                           if m != ref},
      "inverse_variance_ratio": {m: _ratio(q[m], q[ref]) for m in modalities
                                 if m != ref},
      "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
      "val_unimodal_accuracy": val["unimodal_accuracy"],
      "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
      # Rows each evaluation counted (every row of the split exactly once).
      "val_count": val["count"], "test_count": test["count"],
  }


@jax.jit
def _fit_and_predict(held: fusion_weighting.FusionLogits,
                     val: fusion_weighting.FusionLogits,
                     test: fusion_weighting.FusionLogits) -> dict:
  """Every seed's weightings fitted on ``held`` and their predictions on
  ``val`` and ``test`` (every argument stacked over seeds): one program."""
  def one(h, v, t):
    out = {}
    for kind in fusion_weighting.WEIGHTINGS:
      w = fusion_weighting.fusion_weights(kind, h.fused, h.unimodal, h.labels)
      predict = lambda z, w=w: jax.numpy.argmax(
          fusion_weighting.weighted_fusion_logits(z.fused, z.unimodal, w), -1)
      out[kind] = (w, predict(v), predict(t))
    return out
  return jax.vmap(one)(held, val, test)


def weighted_evaluations(helds: list, vals: list, tests: list) -> list[dict]:
  """Per seed, validation/test accuracy with each fusion weighting fitted
  on that seed's held-out logits (:mod:`arl_jax.fusion_weighting`: the
  library's held-out procedure; never the test split).

  ``helds[k]`` is seed ``k``'s held-out :class:`FusionLogits`, ``vals[k]``
  and ``tests[k]`` its evaluations with their logits (the weighted fused
  prediction is recomputed from them, not from the model). The seeds share
  their rows, so every seed is fitted and scored in one jitted program;
  accuracies are counted on the host (float64). Returns one ``{kind:
  {"weights", "val_accuracy", "test_accuracy"}}`` per seed."""
  stack = lambda rs: jax.tree.map(lambda *xs: np.stack(xs), *rs)
  fitted = jax.device_get(_fit_and_predict(
      stack(helds), stack([_logits(r) for r in vals]),
      stack([_logits(r) for r in tests])))
  out = []
  for k, (val, test) in enumerate(zip(vals, tests)):
    seed = {}
    for kind in fusion_weighting.WEIGHTINGS:      # in the library's order
      w, pv, pt = fitted[kind]
      seed[kind] = {"weights": {m: float(x[k]) for m, x in w.items()},
                    "val_accuracy": float(np.mean(pv[k] == val["labels"])),
                    "test_accuracy": float(np.mean(pt[k] == test["labels"]))}
    out.append(seed)
  return out


def _logits(r: dict) -> fusion_weighting.FusionLogits:
  return fusion_weighting.FusionLogits(r["fused_logits"], r["unimodal_logits"],
                                       r["labels"])


def true_class_variance(r: dict) -> dict[str, float]:
  out = {}
  for m, z in r["unimodal_logits"].items():
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    out[m] = float(np.var(np.exp(logp[np.arange(len(r["labels"])),
                                      r["labels"]])))
  return out


def predictions(val: dict, test: dict) -> dict[str, np.ndarray]:
  """The validation and test log-probabilities and labels of an epoch, as
  ``predictions.npz`` holds them."""
  return {f"{split}_{k}": np.asarray(r[k]) for split, r in
          (("validation", val), ("test", test))
          for k in ("log_probs", "labels")}


def save_predictions(workdir: pathlib.Path, arrays: dict) -> None:
  """Validation and test log-probabilities of the best-validation epoch
  (late-fusion ensembles of runs are built from these), written atomically."""
  tmp = workdir / "predictions.tmp.npz"
  np.savez(tmp, **arrays)
  tmp.replace(workdir / "predictions.npz")


def ensure_predictions(workdir: pathlib.Path, arrays: dict) -> None:
  """Rewrites ``predictions.npz`` unless it holds exactly ``arrays`` (it was
  deleted, truncated or changed since the best epoch wrote it)."""
  from experiments import workdir as workdir_lib
  path = workdir / "predictions.npz"
  try:
    with np.load(path) as saved:
      if set(saved.files) == set(arrays) and all(
          np.array_equal(saved[k], v) for k, v in arrays.items()):
        return
      problem = "holds other predictions"
  except FileNotFoundError:
    problem = "is missing"
  except Exception as e:     # noqa: BLE001 -- truncated, not a zip, ...
    problem = f"is unreadable ({type(e).__name__})"
  workdir_lib.log(f"{path} {problem}: rewritten from the checkpoint's copy "
                  "of the best epoch's predictions.")
  save_predictions(workdir, arrays)
