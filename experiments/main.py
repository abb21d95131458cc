"""Thin CLI: ``python -m experiments.main --config CONFIG.py --workdir DIR``.

Config fields are overridden with ``--config.FIELD=VALUE`` (e.g.
``--config.method.name=ogm_ge --config.num_epochs=10``); an unknown field is
an error. Running again with the same ``--workdir`` resumes the run.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  report = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print("results:", {k: v for k, v in report.items()
                     if not isinstance(v, dict)})


if __name__ == "__main__":
  app.run(main)
