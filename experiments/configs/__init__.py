"""Experiment configs: one file per experiment, each with ``get_config()``."""

from collections.abc import Mapping
from typing import Any


def override(config, overrides: Mapping[str, Any]):
  """Sets dotted fields in place, ``{"method.name": "arl"}``; returns ``config``.

  The dict form of ``--config.method.name=arl`` on the command line.
  """
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config
