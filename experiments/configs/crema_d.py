"""CREMA-D, ResNet18 audio + visual, concat, ARL (paper Table 1: 76.61%).

  python -m experiments.main --config experiments/configs/crema_d.py \
      --workdir runs/crema_d --config.data.path=/path/to/CREMA-D
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "crema_d"
  c.data.num_classes = 6
  c.data.num_frames = 1
  c.method.temperature = 8.0
  return c
