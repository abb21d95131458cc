"""Thin CLI: ``python -m experiments.main --config CONFIG.py --workdir DIR``.

Config fields are overridden with ``--config.FIELD=VALUE`` (e.g.
``--config.method.name=ogm_ge --config.num_epochs=10``); an unknown field is
an error. Running again with the same ``--workdir`` resumes the run.

Every local device is used (``--config.parallel.devices=N`` for fewer). On
several hosts, run the same command on each with ``--coordinator
HOST0:PORT --num_processes N --process_id I`` (or ``--coordinator auto`` where
JAX detects the cluster: TPU pods, SLURM, Kubernetes), or the same from the
environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); the workdir must be on a filesystem every host sees.
"""

import os
import signal
import sys


def _interrupted_at_start_up(signum, frame):
  """SIGTERM before training started: nothing to save, one line, exit."""
  del frame
  print(f"{signal.Signals(signum).name} during start-up: nothing was trained "
        "or saved yet; run the same command again.", file=sys.stderr,
        flush=True)
  os._exit(128 + signum)


# First thing (before the heavy imports) when run as the CLI; the training
# loop installs its own handler, which saves, once it runs.
if __name__ == "__main__":
  signal.signal(signal.SIGTERM, _interrupted_at_start_up)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from arl_jax import data as data_lib  # noqa: E402
from experiments import distributed  # noqa: E402
from experiments import train  # noqa: E402
from experiments import workdir as workdir_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run, or "
    "'auto' (JAX's cluster detection)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "number of processes (hosts)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "show the full traceback of an error instead of one line")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 120, "seconds to wait for every process to join")
flags.mark_flags_as_required(["config", "workdir"])


def _unknown_override(argv) -> str | None:
  """The first ``--config.FIELD=...`` naming no field of the default config."""
  from experiments.configs import default
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    node = default.get_config()
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    for n, key in enumerate(path):
      if not hasattr(node, "keys"):
        break
      if key not in node:
        return (f"unknown config field {'.'.join(path[:n + 1])!r} in {arg!r}"
                f"; known fields here: {sorted(node.keys())}.")
      node = node[key]
  return None


def parse_flags(argv):
  """absl's parser, with a one-line message for an override it rejects."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except Exception as e:       # noqa: BLE001 -- ml_collections' overrides
    sys.exit(f"error: {_unknown_override(argv) or f'{type(e).__name__}: {e}'}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  env = os.environ.get
  num = _NUM_PROCESSES.value or env("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env(
      "JAX_PROCESS_ID")
  try:
    distributed.initialize(
        _COORDINATOR.value or env("JAX_COORDINATOR_ADDRESS"),
        None if num is None else int(num), None if pid is None else int(pid),
        _INIT_TIMEOUT.value)
  except distributed.TopologyError as e:
    raise app.UsageError(str(e)) from None
  try:
    report = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except workdir_lib.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("aborted without saving; run the same command again to resume "
          "from the last checkpoint.", file=sys.stderr)
    sys.exit(130)
  except (train.ConfigError, train.TrainingDiverged, workdir_lib.WorkdirBusy,
          workdir_lib.WorkdirError, data_lib.DataError) as e:
    if _DEBUG.value:
      raise
    sys.exit(f"error: {e}")
  except Exception as e:     # noqa: BLE001 -- the file system, one line
    err = workdir_lib.os_error_in(e)
    if err is None or _DEBUG.value:
      raise
    sys.exit(f"error: {workdir_lib.describe_os_error(err)} (--debug shows "
             "the traceback)")
  import jax
  if jax.process_index() == 0:
    for one in report.get("seeds", [report]):
      print("results:", {k: v for k, v in one.items()
                         if not isinstance(v, (dict, list))}, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
