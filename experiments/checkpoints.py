"""The trainer's checkpoints: orbax steps verified by SHA-256 (see
:mod:`experiments.workdir`) before a restore."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from experiments import distributed
from experiments import workdir as workdir_lib


class Checkpoints:
  """orbax steps (numbered by training steps done) with a SHA-256 record
  per step, verified before a restore."""

  def __init__(self, workdir: pathlib.Path, topology):
    self.dir = (workdir / "checkpoints").absolute()
    self.topology = topology
    if topology.is_writer:
      workdir_lib.set_aside_unverified(self.dir, log=workdir_lib.log)
    distributed.barrier("checkpoints verified")
    self._open()

  def _open(self):
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False))

  def restore(self, state):
    """(state, meta, partial metrics or None, predictions or None) of the
    newest step that restores; steps that do not are set aside. ``None``
    when there is none."""
    while (step := self.manager.latest_step()) is not None:
      # Each step is verified before it is read, the older ones a fallback
      # reaches too (set_aside_unverified stopped at the newest intact one).
      reason = (workdir_lib.verify(self.dir / str(step))
                if self.topology.is_writer else None)
      if reason is not None:
        self.manager.close()
        workdir_lib.set_aside(self.dir, step, reason, log=workdir_lib.log)
        self._open()
        continue
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        items = {"state": ocp.args.StandardRestore(
            self.topology.checkpointable(state))}
        if meta.get("position"):
          items["partial"] = ocp.args.StandardRestore()
        if meta.get("has_predictions"):
          items["predictions"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step,
                                        args=ocp.args.Composite(**items))
      except Exception as e:       # noqa: BLE001 -- any unreadable step
        if jax.process_count() > 1:
          raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        self.manager.close()
        workdir_lib.set_aside(self.dir, step, "orbax cannot restore it ("
                              f"{type(e).__name__}: {first})", log=workdir_lib.log)
        self._open()
        continue
      partial = restored["partial"] if meta.get("position") else None
      predictions = (dict(restored["predictions"])
                     if meta.get("has_predictions") else None)
      return (self.topology.from_checkpoint(restored["state"]), dict(meta),
              partial, predictions)
    return None

  def save(self, step: int, state, meta: dict, partial=None,
           predictions=None) -> None:
    """Saves a step: the state, the run's record (``meta``), the epoch's
    step metrics so far (``partial``, mid-epoch) and the best epoch's
    predictions (covered by the step's checksums like the rest)."""
    meta = {**meta, "has_predictions": predictions is not None}
    items = {"state": ocp.args.StandardSave(
                 self.topology.checkpointable(state)),
             "meta": ocp.args.JsonSave(meta)}
    if partial is not None:
      items["partial"] = ocp.args.StandardSave(partial)
    if predictions is not None:
      items["predictions"] = ocp.args.StandardSave(predictions)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      self.manager.wait_until_finished()
    except Exception as e:     # noqa: BLE001 -- orbax wraps the OS's errors
      err = workdir_lib.os_error_in(e)
      if err is None:
        raise
      steps = workdir_lib.saved_steps(self.dir)
      size = (workdir_lib.folder_size(self.dir / str(steps[-1])) if steps
              else 0)
      needs = (f"One checkpoint of this run takes about {size / 1e6:.1f} MB "
               f"in {self.dir} (two are kept); the previous one is intact."
               if size else "")
      raise workdir_lib.WorkdirError(workdir_lib.describe_os_error(
          err, f"saving checkpoint step {step} failed:", needs)) from e
    distributed.barrier(f"checkpoint {step} saved")
    if self.topology.is_writer:
      workdir_lib.write_checksums(self.dir / str(step))
    distributed.barrier(f"checkpoint {step} recorded")

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
