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
    """(state, meta, partial metrics or None) of the newest step that
    restores; steps that do not are set aside. ``None`` when there is none."""
    while (step := self.manager.latest_step()) is not None:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        items = {"state": ocp.args.StandardRestore(
            self.topology.checkpointable(state))}
        if meta.get("position"):
          items["partial"] = ocp.args.StandardRestore()
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
      return (self.topology.from_checkpoint(restored["state"]), dict(meta),
              partial)
    return None

  def save(self, step: int, state, meta: dict, partial=None) -> None:
    items = {"state": ocp.args.StandardSave(
                 self.topology.checkpointable(state)),
             "meta": ocp.args.JsonSave(meta)}
    if partial is not None:
      items["partial"] = ocp.args.StandardSave(partial)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    distributed.barrier(f"checkpoint {step} saved")
    if self.topology.is_writer:
      workdir_lib.write_checksums(self.dir / str(step))
    distributed.barrier(f"checkpoint {step} recorded")

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
