"""The main job: every balancing method, several seeds, offline problems.

Settings: (a) synthetic two-modality problems with unequal noise and a known
Bayes-optimal accuracy (linear-Gaussian, and the same seen through a
non-linear bijection); (b) UCI Multiple Features with a strong view paired
with a weak one, and a three-view setting. For each: test accuracy and
macro-F1 at the best *validation* epoch (mean +- std over seeds), the gap to
the Bayes accuracy where known, and the final dependency ratio next to the
inverse-variance ratio (the paper's Fig. 3 quantities). Writes
``experiments/results/compare.{md,json}`` and plots; each run keeps its own
workdir under ``workdirs/compare`` and is reused if already finished.

  python -m experiments.compare            # or: make run   (~5 min, 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
METHODS = ("concat", "unimodal_regularisation", "arl_no_residual", "arl",
           "arl_released", "arl_released_applied", "ogm_ge")


def settings():
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


def run_all(seeds, workroot: pathlib.Path, only=None):
  from experiments import train
  results, reused = {}, []
  for name, base in settings().items():
    if only and name not in only:
      continue
    for method in METHODS:
      for seed in seeds:
        c = base.copy_and_resolve_references()
        c.method.name = method
        if method == "ogm_ge":
          c.method.alpha = 0.5
        c.seed = seed
        c.plots = False
        c.progress = "none"
        c.checkpoint_every_epochs = c.num_epochs
        workdir = workroot / name / method / f"seed{seed}"
        done = workdir / "results.json"
        start = time.perf_counter()
        if done.exists():        # a finished run: read back, not retrained
          report = json.loads(done.read_text())
          reused.append(str(workdir))
          took = "read back"
        else:
          report = train.train_and_evaluate(c, workdir)
          took = f"{time.perf_counter() - start:.1f} s"
        results.setdefault(name, {}).setdefault(method, []).append(report)
        print(f"{name:38s} {method:24s} seed {seed}: test acc "
              f"{report['test_accuracy_at_best_val']:.4f} ({took})", flush=True)
  return results, reused


def _ms(values, fmt="{:.2f}"):
  v = 100 * np.asarray(values)
  return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"


def table(results) -> str:
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
    head = "| method | test acc % (best val) | macro-F1 % | test acc % (last) |"
    sep = "|---|---|---|---|"
    if bayes is not None:
      head += " gap to Bayes (pts) |"
      sep += "---|"
    head += " dependency ratio (final) | inverse-variance ratio (final) |"
    sep += "---|---|"
    lines += [head, sep]
    for method, reports in by_method.items():
      acc = [r["test_accuracy_at_best_val"] for r in reports]
      row = (f"| {method} | {_ms(acc)} | "
             f"{_ms([r['test_macro_f1_at_best_val'] for r in reports])} | "
             f"{_ms([r['test_accuracy_last'] for r in reports])} |")
      if bayes is not None:
        row += f" {100 * (bayes - np.mean(acc)):.2f} |"
      dep = reports[0]["dependency_ratio_last"]
      ratio = lambda key, m, reports=reports: np.mean([r[key][m]
                                                       for r in reports])
      row += (" " + ", ".join(f"{m}: {ratio('dependency_ratio_last', m):.2f}"
                              for m in dep) + " | "
              + ", ".join(f"{m}: {ratio('inverse_variance_ratio_last', m):.2f}"
                          for m in dep) + " |")
      lines.append(row)
    lines.append("")
  return "\n".join(lines)


def plot(results, out: pathlib.Path, workroot: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results)
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8))
  for ax, name in zip(np.atleast_1d(axes), names):
    by = results[name]
    acc = [100 * np.array([r["test_accuracy_at_best_val"] for r in by[m]])
           for m in by]
    ax.bar(range(len(by)), [a.mean() for a in acc],
           yerr=[a.std() for a in acc], color="C0", alpha=0.8)
    bayes = next(iter(by.values()))[0].get("bayes_accuracy")
    if bayes is not None:
      ax.axhline(100 * bayes, color="k", ls="--", lw=1, label="Bayes")
      ax.legend(fontsize=7)
    lo = min(a.mean() - a.std() for a in acc)
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_xticks(range(len(by)))
    ax.set_xticklabels(list(by), rotation=60, ha="right", fontsize=7)
    ax.set_title(name, fontsize=8)
    ax.set_ylabel("test accuracy % (best val epoch)")
  from experiments import plots
  plots._save(fig, out / "compare_accuracy.png")
  # Fig. 3 view and coefficients of ARL, seed 0, each setting.
  for name in names:
    wd = workroot / name / "arl" / "seed0"
    path = wd / "metrics.jsonl"
    if path.exists():
      history = [json.loads(l) for l in path.read_text().splitlines()]
      for p in plots.plot_run(history, wd, title=f"{name} / arl / seed 0"):
        (out / f"{name}_{p.name}").write_bytes(p.read_bytes())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--workroot", default=str(ROOT / "workdirs" / "compare"))
  parser.add_argument("--out", default=str(OUT))
  parser.add_argument("--only", nargs="*", default=None)
  args = parser.parse_args(argv)
  import jax
  workroot = pathlib.Path(args.workroot)
  # Seeds of one setting compile to the same program: reuse it across runs.
  jax.config.update("jax_compilation_cache_dir", str(workroot / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  results, reused = run_all(range(args.seeds), workroot, args.only)
  runs = sum(len(v) for by_method in results.values() for v in by_method.values())
  shown = (os.path.relpath(workroot) if workroot.is_absolute()
           else str(workroot))
  reuse_note = (f" ({len(reused)} of {runs} runs read back from finished "
                f"runs in {shown}; delete it to train them again)"
                if reused else "")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  elapsed = time.perf_counter() - start
  md = ("# Offline comparison of balancing methods\n\n"
        f"- command: `python -m experiments.compare --seeds {args.seeds}` "
        "(README command 1: `make run`)\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, jax {jax.__version__}, backend "
        f"{jax.default_backend()}; {elapsed / 60:.1f} min in all"
        f"{reuse_note}\n"
        f"- {args.seeds} seeds per cell (mean ± std); model selection on the "
        "validation split only; 'last' is the final epoch. Dependency ratio "
        "s_m / s_ref and inverse-variance ratio q_m / q_ref (ref: the last "
        "modality) are train-epoch means at the final epoch.\n\n"
        + table(results))
  (out / "compare.md").write_text(md)
  (out / "compare.json").write_text(json.dumps(results, indent=1))
  plot(results, out, workroot)
  print(md)


if __name__ == "__main__":
  main()
