"""Plots of one run's metrics.jsonl (matplotlib, PNG)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(history: list[dict], workdir, title: str = "") -> list[pathlib.Path]:
  """Training curves, coefficients, and the paper's Fig. 3 view."""
  workdir = pathlib.Path(workdir)
  epochs = [h["epoch"] for h in history]
  out = []

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("loss")
  ax1.legend()
  for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
    ax2.plot(epochs, [h[key] for h in history], label=key.replace("_", " "))
  for m in history[0]["val_unimodal_accuracy"]:
    ax2.plot(epochs, [h["val_unimodal_accuracy"][m] for h in history], "--",
             label=f"val {m} only")
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("accuracy")
  ax2.legend(fontsize=7)
  fig.suptitle(title)
  out.append(_save(fig, workdir / "training_curves.png"))

  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for m in history[0]["a"]:
    ax.plot(epochs, [h["a"][m] for h in history], label=f"a[{m}]")
  warm = [h["epoch"] for h in history if h["warmup"] > 0.5]
  if warm:
    ax.axvspan(0.5, max(warm) + 0.5, color="grey", alpha=0.15, label="warm-up")
  ax.set_xlabel("epoch")
  ax.set_ylabel("coefficient (epoch mean)")
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  out.append(_save(fig, workdir / "coefficients.png"))

  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for m in history[0]["dependency_ratio"]:
    ax.plot(epochs, [h["dependency_ratio"][m] for h in history],
            label=f"dependency ratio s[{m}]/s[ref]")
    ax.plot(epochs, [h["inverse_variance_ratio"][m] for h in history], "--",
            label=f"inverse-variance ratio q[{m}]/q[ref]")
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set_xlabel("epoch")
  ax.set_ylabel("ratio")
  ax.legend(fontsize=7)
  ax.set_title("Fig. 3 view: " + title, fontsize=9)
  out.append(_save(fig, workdir / "fig3_ratios.png"))
  return out
